"""A whole training step, as a user sees it: a student and a frozen teacher (Llama configs, random weights), and
full optimizer steps — both models' forward, the loss, the backward, AdamW — timed in each competitor's trainer.

    python -m bench.trainer_step [--preset tiny | 1b-8b] [--competitors NAME ...] [--warmup N] [--steps N]
                                 [--output DIR] [--dry-run]

Competitors (every one a Trainer on the same batches and the same initial weights, the same TrainingArguments;
the loss is generalized JSD with β = 0.5 at temperature 1 over every predicted position, the one divergence they
all compute, so their first-step losses agree):

* kdops-transformers  `kdops.integrations.transformers.DistillationTrainer(divergence=GeneralizedJSD(0.5))`;
* kdops-trl           `kdops.integrations.trl.DistillationTrainer` (its default: TRL's loss, computed by kdops);
* trl                 `trl.DistillationTrainer` with its own chunked loss;
* liger-jsd           a transformers Trainer (kdops' DistillationTrainer with its loss replaced) whose loss is
                      Liger's `LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta=0.5)` on both
                      decoders' final hidden states (Liger ships no distillation trainer; torch.compile'd on CUDA);
* torch-logits        the same Trainer with the plain PyTorch loss on both models' full `.logits` (float32
                      log_softmax, the mixture by logsumexp, `F.kl_div`): for orientation, "oom" where it does not fit.

TRL's DistillationTrainer (1.16) is on-policy only: it always generates the completions (vLLM or
`model.generate`), and no option of its config turns that off. To train it on given sequences, its generation
step (`_generate_and_score_completions`) is replaced by one that returns each example's own tokens — a one-token
prompt and the rest of the sequence as the completion, all of it in the loss — so everything after generation
(its batching, masks, `num_items_in_batch`, the loss, logging) stays TRL's.

Per competitor, in one record (JSON lines, `trainer-step-<device>.jsonl` in `bench.report.record_dir(device)` or
`--output`): tokens/s (batch × sequence over the median step), the median and IQR of the step's milliseconds
over the timed steps (from the trainer's on_step_begin, after the batch is fetched, to its on_step_end, after
the optimizer step; the device synchronized at both ends), memory, the first step's loss and its relative
difference to the reference loss (torch-logits, else trl), status "ok" / "oom" / "error" / "skipped" with a
message, and the versions. Memory: `peak_bytes` = torch.cuda.max_memory_allocated over the timed steps (both
models, the student's gradients and AdamW states, activations, the loss; CUDA only); `step_peak_bytes` = the
most bytes live at once in a step beyond those live when it began (activations, gradients, the loss): on CUDA
the same counter less the step's start, on the CPU `bench.memory.AllocationTracker` over one more, untimed step.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .competitors import import_reason
from .measure import failure, free_memory, median_iqr

BETA, TEMPERATURE = 0.5, 1.0
DIVERGENCE_TEXT = f"generalized_jsd(beta={BETA}), T={TEMPERATURE}"
LEARNING_RATE = 1e-5
REFERENCES = ("torch-logits", "trl")  # the first that ran gives the reference loss
MiB, GiB = 2**20, 2**30


# --- presets -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A Llama decoder's shape."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False

    def parameters(self, vocab: int) -> int:
        """Its parameter count: attention (q, o: H² each; k, v: H × kv_heads · head_dim), the SwiGLU MLP (3 · H · I),
        two norms per layer, the final norm, the embeddings and the lm_head (unless tied)."""
        kv = self.kv_heads * (self.hidden // self.heads)
        layer = 2 * self.hidden**2 + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + self.hidden + vocab * self.hidden * (1 if self.tied else 2)

    def config(self, vocab: int, sequence: int, init_std: float):
        """A transformers.LlamaConfig of this shape, its weights drawn with standard deviation `init_std` (no KV cache:
        training)."""
        import transformers

        return transformers.LlamaConfig(
            initializer_range=init_std, vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, intermediate_size=self.intermediate,
            tie_word_embeddings=self.tied, max_position_embeddings=sequence, use_cache=False, pad_token_id=0,
            eos_token_id=1, bos_token_id=None)


@dataclass(frozen=True)
class Preset:
    """Both models (random weights of standard deviation `init_std`), the batch and the run's defaults; `step_s` and
    `setup_s` are the estimates of one step and of one competitor's setup (student built, trainer constructed,
    first-step extras aside), on `device_type`."""

    name: str
    student: Shape
    teacher: Shape
    vocab: int
    sequence: int
    batch: int
    dtype: str
    warmup: int
    steps: int
    gradient_checkpointing: bool
    device_type: str
    step_s: float
    setup_s: float
    init_std: float = 0.02

    @property
    def tokens(self) -> int:
        return self.batch * self.sequence

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


PRESETS = {p.name: p for p in (
    # On a CPU: seconds for the whole run, float32; weights of std 0.2 (not Llama's 0.02), so that the tiny models'
    # distributions are far from uniform and the losses far from 0.
    Preset("tiny", Shape(64, 2, 4, 2, 128), Shape(128, 3, 4, 2, 256), vocab=2048, sequence=48, batch=2,
           dtype="float32", warmup=1, steps=3, gradient_checkpointing=False, device_type="cpu", step_s=0.3,
           setup_s=1.5, init_std=0.2),
    # On an 80 GB GPU: a Llama-3.2-1B-shaped student (tied embeddings, 1.24 B parameters) and a Llama-3-8B-shaped
    # teacher (8.03 B), bf16 weights, no autocast. Both fit without gradient checkpointing (`memory_plan`). A step
    # is about 107 TFLOP (6 · 1.24 B · 4096 for the student, 2 · 8.03 B · 4096 for the teacher, attention): 0.35 s
    # at a third of an H100's dense bf16 peak.
    Preset("1b-8b", Shape(2048, 16, 32, 8, 8192, tied=True), Shape(4096, 32, 32, 8, 14336), vocab=128256,
           sequence=4096, batch=1, dtype="bfloat16", warmup=3, steps=5, gradient_checkpointing=False,
           device_type="cuda", step_s=0.35, setup_s=4.0),
)}

#: Bytes of saved activations per token per decoder layer, without checkpointing: element size × (13·H + 4·I).
#: (Checked on the CPU with bench.memory.AllocationTracker: a bf16 Llama layer at H 2048, I 8192 keeps 106 KiB per
#: token; the formula says 116 KiB.)
ACTIVATION_H, ACTIVATION_I = 13, 4
#: The full-logits loss at its peak: about this many float32 [tokens, V] buffers (both log-softmaxes, the
#: mixture, the KL terms, their gradients).
LOGITS_BUFFERS = 10


def memory_plan(preset: Preset) -> dict[str, int]:
    """Bytes the preset needs on its device: the teacher's weights; the student's weights, gradients and AdamW's two
    states (all in the preset's dtype); the student's saved activations (`ACTIVATION_H`, `ACTIVATION_I`, none kept
    per layer under gradient checkpointing but its input); the full-logits loss's float32 buffers."""
    size = torch.tensor([], dtype=preset.torch_dtype).element_size()
    student = preset.student.parameters(preset.vocab)
    per_layer = size * (ACTIVATION_H * preset.student.hidden + ACTIVATION_I * preset.student.intermediate)
    if preset.gradient_checkpointing:
        per_layer = size * preset.student.hidden
    return {"teacher weights": size * preset.teacher.parameters(preset.vocab),
            "student weights + gradients + AdamW": 4 * size * student,
            "student activations": per_layer * preset.tokens * preset.student.layers,
            "full-logits loss (torch-logits only)": LOGITS_BUFFERS * 4 * preset.tokens * preset.vocab}


# --- the competitors' trainers -------------------------------------------------------------------------------------

def _recording(base):
    """`base` with the loss of each micro-batch kept (detached) in `trainer.step_losses`."""

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            vars(self).setdefault("step_losses", []).append((out[0] if return_outputs else out).detach())
            return out

    return _named(Recording, base)


def _named(cls, base):
    """`cls`, a subclass of `base`, under `base`'s name."""
    cls.__name__ = cls.__qualname__ = base.__name__
    return cls


def _in_order(base):
    """The transformers Trainer `base` reading its training set in order (any transformers version; TRL's own
    sampler is told so by `shuffle_dataset=False`)."""

    class InOrder(base):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return _named(InOrder, base)


def _given_completions(base):
    """TRL's DistillationTrainer `base` trained on given sequences: its generation step returns each example's own
    `prompt_ids` and `completion_ids` (all completion tokens in the loss) instead of generating."""

    class GivenCompletions(base):
        def _generate_and_score_completions(self, inputs):
            device = self.accelerator.device
            prompt = torch.stack([x["prompt_ids"] for x in inputs]).to(device)
            completion = torch.stack([x["completion_ids"] for x in inputs]).to(device)
            mask = torch.ones_like(completion)
            return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
                    "completion_mask": mask, "num_items_in_batch": self.accelerator.gather(mask.sum()).sum()}

    return _named(GivenCompletions, base)


def _with_loss(loss_fn):
    """kdops' transformers DistillationTrainer (a transformers.Trainer with a frozen teacher) whose loss is
    `loss_fn(student, teacher, batch)`: (sum over predicted tokens, their number), divided by the Trainer's
    `num_items_in_batch` where it passes one."""
    from kdops.integrations.transformers import DistillationTrainer

    class LossTrainer(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total, count = loss_fn(model, self.teacher_model, inputs)
            loss = total / (count if num_items_in_batch is None else num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return LossTrainer


def _shifted(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels of the next token at each position, ignore_index at the last; the mask of those counted)."""
    from kdops.integrations.transformers import shift_labels

    labels = shift_labels(inputs["labels"])
    return labels, labels != -100


def liger_loss(student, teacher, inputs):
    """Liger's LigerFusedLinearJSDLoss (β = 0.5, no hard-label term) on the decoders' final hidden states and
    lm_heads (through kdops' `final_hidden_and_head`): (its mean × the count, the count)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    from kdops.integrations.transformers import final_hidden_and_head

    hidden, weight, _ = final_hidden_and_head(student, inputs["input_ids"], inputs.get("attention_mask"))
    with torch.no_grad():
        t_hidden, t_weight, _ = final_hidden_and_head(teacher, inputs["input_ids"], inputs.get("attention_mask"))
    labels, counted = _shifted(inputs)
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=TEMPERATURE,
                                      compiled=hidden.is_cuda)
    mean = loss_fn(hidden.flatten(0, 1), weight, t_hidden.flatten(0, 1), t_weight, labels.flatten())
    count = counted.sum()
    return mean * count, count


def logits_loss(student, teacher, inputs):
    """The plain loss on both models' full `.logits` (`kdops.torch_math`, the reference's math): (its sum over
    counted tokens, their count)."""
    from kdops.divergences import GeneralizedJSD
    from kdops.torch_math import divergence_rows

    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    logits = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    _, counted = _shifted(inputs)
    rows = divergence_rows(GeneralizedJSD(BETA), logits, t_logits, TEMPERATURE)
    return torch.where(counted, rows, 0.0).sum(), counted.sum()


def _kdops_transformers():
    from kdops.integrations.transformers import DistillationTrainer

    return _recording(_in_order(DistillationTrainer))


def _kdops_trl():
    from kdops.integrations.trl import DistillationTrainer

    return _recording(_given_completions(DistillationTrainer))


def _trl():
    import trl

    return _recording(_given_completions(trl.DistillationTrainer))


def _liger():
    return _recording(_in_order(_with_loss(liger_loss)))


def _torch_logits():
    return _recording(_in_order(_with_loss(logits_loss)))


def _kdops_options() -> dict:
    import kdops

    return {"divergence": kdops.GeneralizedJSD(BETA), "temperature": TEMPERATURE}


TRL_NEEDS = (("transformers", "transformers"), ("trl", "trl.trainer.distillation_trainer"))


@dataclass(frozen=True)
class Competitor:
    """A trainer class (`trainer()`, imported on use), its kind ("transformers": a Trainer on causal-LM batches;
    "trl": TRL's DistillationTrainer on given completions), the (package, module) pairs it needs, extra trainer
    keywords, and `compile_s`: the seconds its first step spends compiling on CUDA, beyond `Preset.step_s`."""

    name: str
    trainer: Callable[[], type]
    kind: str
    needs: tuple[tuple[str, str], ...]
    options: Callable[[], dict] = dict
    compile_s: float = 5.0

    def missing(self) -> str | None:
        """Why it cannot run here (a package that does not import), or None."""
        return next(filter(None, (import_reason(package, module) for package, module in self.needs)), None)


COMPETITORS = (
    Competitor("kdops-transformers", _kdops_transformers, "transformers", (("transformers", "transformers"),),
               _kdops_options, compile_s=10.0),
    Competitor("kdops-trl", _kdops_trl, "trl", TRL_NEEDS, compile_s=10.0),
    Competitor("trl", _trl, "trl", TRL_NEEDS),
    Competitor("liger-jsd", _liger, "transformers",
               (("transformers", "transformers"), ("liger-kernel", "liger_kernel.chunked_loss")), compile_s=40.0),
    Competitor("torch-logits", _torch_logits, "transformers", (("transformers", "transformers"),)),
)
BY_NAME = {c.name: c for c in COMPETITORS}

#: Seconds before the first competitor: the imports (torch, transformers, TRL, Liger) and the teacher's build.
START_S = {"cpu": 10.0, "cuda": 25.0}


def estimate_s(preset: Preset, competitor: Competitor, warmup: int, steps: int) -> float:
    """Seconds of one competitor's run: its setup, its steps (one more, tracked for memory, on the CPU) and, on
    CUDA, its first step's compilation."""
    extra = competitor.compile_s if preset.device_type == "cuda" else 0.0
    tracked = 1 if preset.device_type == "cpu" else 0
    return preset.setup_s + extra + (warmup + steps + tracked) * preset.step_s


def run_estimate_s(preset: Preset, competitors, warmup: int, steps: int) -> float:
    """Seconds of a whole run: `START_S` and every competitor's `estimate_s`."""
    return START_S[preset.device_type] + sum(estimate_s(preset, c, warmup, steps) for c in competitors)


# --- models, data, arguments ----------------------------------------------------------------------------------------

def build_model(shape: Shape, preset: Preset, device, seed: int):
    """A LlamaForCausalLM of `shape` with random weights drawn from `seed`, built on `device` in the preset's dtype
    (the same weights every time on one device; the parameters never exist in another dtype or place)."""
    import transformers

    config = shape.config(preset.vocab, preset.sequence, preset.init_std)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(preset.torch_dtype)
    try:
        with torch.device(device):
            return transformers.LlamaForCausalLM(config).train()
    finally:
        torch.set_default_dtype(default)


def build_teacher(preset: Preset, device):
    """The frozen teacher (seed 1), in eval mode."""
    return build_model(preset.teacher, preset, device, seed=1).eval().requires_grad_(False)


def token_batches(preset: Preset, count: int, seed: int = 0) -> torch.Tensor:
    """`count` × batch sequences of random token ids, [count · batch, sequence] (the same on every run)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, preset.vocab, (count * preset.batch, preset.sequence), generator=g)


def dataset(kind: str, ids: torch.Tensor) -> list[dict]:
    """Examples of `ids`: causal-LM examples (labels = input ids) for a transformers Trainer; for TRL, a one-token
    prompt and the rest as the completion."""
    if kind == "trl":
        return [{"prompt_ids": row[:1], "completion_ids": row[1:]} for row in ids]
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]


def training_arguments(preset: Preset, device, output_dir: str, max_steps: int) -> dict:
    """What every competitor's Trainer is given: no evaluation, saving, logging or progress bar; the preset's batch
    and gradient checkpointing; a constant learning rate; no autocast (the weights are in the preset's dtype)."""
    return dict(output_dir=output_dir, per_device_train_batch_size=preset.batch, gradient_accumulation_steps=1,
                max_steps=max_steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
                report_to="none", save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
                bf16=False, fp16=False, **{_checkpointing_field(): preset.gradient_checkpointing},
                use_cpu=torch.device(device).type == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
                seed=0)


def _checkpointing_field() -> str:
    """transformers' name of the gradient-checkpointing argument: `activation_checkpointing` from 5.x on."""
    import transformers

    fields = transformers.TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def tokenizer():
    """TRL's trainer wants a tokenizer for its special ids only (nothing is tokenized here): pad 0, eos 1, unk 2."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def make_trainer(competitor: Competitor, student, teacher, examples: list, arguments: dict):
    """The competitor's trainer on `examples`, without the callback that prints its logs."""
    import transformers

    trainer = _construct(competitor, student, teacher, examples, arguments)
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def _construct(competitor: Competitor, student, teacher, examples: list, arguments: dict):
    """The competitor's trainer class, constructed."""
    cls = competitor.trainer()
    if competitor.kind == "trl":
        import trl

        args = trl.DistillationConfig(**arguments, beta=BETA, temperature=TEMPERATURE, shuffle_dataset=False,
                                      max_completion_length=len(examples[0]["completion_ids"]))
        return cls(model=student, teacher_model=teacher, args=args, train_dataset=examples,
                   processing_class=tokenizer(), **competitor.options())
    import transformers

    return cls(model=student, teacher_model=teacher, args=transformers.TrainingArguments(**arguments),
               train_dataset=examples, **competitor.options())


# --- timing --------------------------------------------------------------------------------------------------------

def step_clock(device, tracked_step: int | None):
    """A TrainerCallback that times every optimizer step and measures its memory (see the module's docstring);
    `tracked_step`: the step (from 0) traced by AllocationTracker off CUDA."""
    import transformers

    from .memory import AllocationTracker

    cuda = torch.device(device).type == "cuda"

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.ms, self.peaks, self.step_peaks = [], [], []
            self.tracker, self.base, self.start = None, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            elif state.global_step == tracked_step:
                self.tracker = AllocationTracker().__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ms.append((time.perf_counter() - self.start) * 1e3)
            if cuda:
                self.peaks.append(torch.cuda.max_memory_allocated())
                self.step_peaks.append(self.peaks[-1] - self.base)
            elif self.tracker is not None:
                self.tracker.__exit__(None, None, None)
                self.step_peaks.append(self.tracker.peak)
                self.tracker = None

    return StepClock()


def figures(clock, losses: list, preset: Preset, warmup: int, steps: int) -> dict:
    """A run's figures: median and IQR of the timed steps, tokens/s, memory, the first step's loss."""
    median, iqr = median_iqr(clock.ms[warmup:warmup + steps])
    peaks = clock.peaks[warmup:warmup + steps]
    step_peaks = clock.step_peaks[warmup:warmup + steps] if clock.peaks else clock.step_peaks
    first = float(losses[0]) if losses else None
    return {"step_ms": median, "step_iqr_ms": iqr, "tokens_per_s": preset.tokens / (median / 1e3),
            "peak_bytes": max(peaks) if peaks else None, "step_peak_bytes": max(step_peaks) if step_peaks else None,
            "first_loss": first if first is not None and math.isfinite(first) else None}


def run_competitor(competitor: Competitor, preset: Preset, teacher, ids: torch.Tensor, device, warmup: int,
                   steps: int) -> dict:
    """One competitor's figures, or its status "oom" / "error" and message."""
    tracked = warmup + steps if torch.device(device).type == "cpu" else None
    clock = step_clock(device, tracked)
    try:
        losses = train(competitor, preset, teacher, ids, device, warmup + steps + (tracked is not None), clock)
        return {"status": "ok", "message": "", **figures(clock, losses, preset, warmup, steps)}
    except Exception as error:  # noqa: BLE001 - one competitor's failure is a record
        result = failure(competitor.name, error)
        return {"status": result.status, "message": result.message}
    finally:
        free_memory(device)  # a collection and, on CUDA, empty_cache()


def train(competitor: Competitor, preset: Preset, teacher, ids: torch.Tensor, device, max_steps: int, clock) -> list:
    """`max_steps` optimizer steps of the competitor's trainer, `clock` its callback, its student built afresh
    (seed 0); the loss of each step. What the trainer holds on the device is let go on the way out."""
    trainer = None
    try:
        with tempfile.TemporaryDirectory(prefix="kdops-trainer-step-") as out:
            student = build_model(preset.student, preset, device, seed=0)
            arguments = training_arguments(preset, device, out, max_steps)
            trainer = make_trainer(competitor, student, teacher, dataset(competitor.kind, ids), arguments)
            trainer.add_callback(clock)
            trainer.train()
            return [float(loss) for loss in trainer.step_losses]
    finally:
        if clock.tracker is not None:  # a step that raised while traced
            clock.tracker.__exit__(None, None, None)
        if trainer is not None:
            trainer.accelerator.free_memory()


# --- records -------------------------------------------------------------------------------------------------------

def metadata(preset: Preset, device, warmup: int, steps: int) -> dict:
    """What every record carries: `bench.report.run_metadata` (device, commit, torch, triton, kdops, liger_kernel),
    the transformers and TRL versions, and the run's setting."""
    from .report import package_version, run_metadata

    return {**run_metadata(device, preset.name, steps, warmup), "transformers": package_version("transformers"),
            "trl": package_version("trl"), "divergence": DIVERGENCE_TEXT, "dtype": preset.dtype,
            "batch": preset.batch,
            "sequence": preset.sequence, "tokens_per_step": preset.tokens, "vocab": preset.vocab,
            "student_params": preset.student.parameters(preset.vocab),
            "teacher_params": preset.teacher.parameters(preset.vocab),
            "gradient_checkpointing": preset.gradient_checkpointing,
            "memory_measure": ("torch.cuda.max_memory_allocated" if torch.device(device).type == "cuda"
                               else "bench.memory.AllocationTracker")}


EMPTY = dict.fromkeys(("step_ms", "step_iqr_ms", "tokens_per_s", "peak_bytes", "step_peak_bytes", "first_loss"))


def add_loss_differences(records: list[dict]) -> None:
    """`loss_rel_diff` = |first_loss − reference's| / |reference's| in each record (the reference: the first of
    `REFERENCES` that ran), and `loss_reference` its name."""
    ran = {r["competitor"]: r["first_loss"] for r in records if r["first_loss"] is not None}
    name = next((n for n in REFERENCES if n in ran), None)
    for r in records:
        r["loss_reference"] = name
        r["loss_rel_diff"] = (None if name is None or r["first_loss"] is None
                              else abs(r["first_loss"] - ran[name]) / max(abs(ran[name]), 1e-30))


def run(preset: Preset, competitors=None, device=None, warmup: int | None = None, steps: int | None = None,
        fits: Callable[[float], bool] = lambda seconds: True) -> list[dict]:
    """A record per competitor (default: all of `COMPETITORS`): "skipped" where a package is missing or `fits(its
    estimate)` is false, else its run (see the module's docstring)."""
    competitors = COMPETITORS if competitors is None else competitors
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    warmup = preset.warmup if warmup is None else warmup
    steps = preset.steps if steps is None else steps
    meta = metadata(preset, device, warmup, steps)
    runnable = [c for c in competitors if c.missing() is None]
    teacher = build_teacher(preset, device) if runnable else None
    ids = token_batches(preset, warmup + steps + 1)
    records = []
    for c in competitors:
        seconds = estimate_s(preset, c, warmup, steps)
        reason = c.missing() or (None if fits(seconds) else f"skipped for time (estimated {seconds:.0f} s)")
        outcome = ({"status": "skipped", "message": reason} if reason
                   else run_competitor(c, preset, teacher, ids, device, warmup, steps))
        records.append({**meta, "competitor": c.name, "status": None, "message": None, **EMPTY, **outcome})
    add_loss_differences(records)
    return records


def write_records(records: list[dict], folder: Path) -> Path:
    """Append the records to <folder>/trainer-step-<device slug>.jsonl."""
    from .report import append_jsonl, slug

    path = Path(folder) / f"trainer-step-{slug(records[0]['device'])}.jsonl"
    append_jsonl(records, path)
    return path


HEADER = ["competitor", "status", "tokens/s", "step ms", "± IQR", "peak MiB", "step peak MiB", "first loss",
          "Δloss"]


def _mib(value) -> float | None:
    return None if value is None else value / MiB


def table_rows(records: list[dict]) -> list[list]:
    """The markdown table's rows: figures where a competitor ran, its status and message where not."""
    rows = []
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['message']}"
        rows.append([r["competitor"], status, r["tokens_per_s"], r["step_ms"], r["step_iqr_ms"], _mib(r["peak_bytes"]),
                     _mib(r["step_peak_bytes"]), r["first_loss"], r["loss_rel_diff"]])
    return rows


def table(records: list[dict]) -> str:
    """The records as a markdown table."""
    from .campaign.markdown import table_lines

    return "\n".join(table_lines(HEADER, table_rows(records)))


def describe(preset: Preset, warmup: int, steps: int) -> list[str]:
    """The setting in a few lines: the models, the batch, the memory plan."""
    student, teacher = (shape.parameters(preset.vocab) / 1e9 for shape in (preset.student, preset.teacher))
    lines = [f"preset {preset.name}: student {student:.3g} B parameters, teacher {teacher:.3g} B, vocabulary "
             f"{preset.vocab}, batch {preset.batch} × {preset.sequence} tokens, {preset.dtype}, gradient checkpointing "
             f"{'on' if preset.gradient_checkpointing else 'off'}; {warmup} warm-up + {steps} timed steps; "
             f"loss {DIVERGENCE_TEXT}", "memory plan:"]
    lines += [f"  {name}: {size / GiB:.1f} GiB" for name, size in memory_plan(preset).items()]
    return lines


def dry_run_lines(preset: Preset, competitors, warmup: int, steps: int) -> list[str]:
    """The setting and every competitor with its time estimate (or why it would be skipped)."""
    lines = describe(preset, warmup, steps) + ["competitors:"]
    for c in competitors:
        reason = c.missing()
        lines.append(f"  {c.name}: " + (f"skipped ({reason})" if reason
                                        else f"~{estimate_s(preset, c, warmup, steps):.0f} s"))
    total = run_estimate_s(preset, [c for c in competitors if c.missing() is None], warmup, steps)
    return lines + [f"estimated total ~{total:.0f} s on {preset.device_type}"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="default: 1b-8b where CUDA is available, tiny elsewhere")
    parser.add_argument("--competitors", nargs="+", choices=list(BY_NAME), help="default: all")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    parser.add_argument("--steps", type=int, help="timed steps (default: the preset's)")
    parser.add_argument("--output", help="folder of the JSON lines (default: bench.report.record_dir(device))")
    parser.add_argument("--dry-run", action="store_true", help="list the competitors with time estimates")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = PRESETS[args.preset or ("1b-8b" if cuda else "tiny")]
    competitors = [BY_NAME[n] for n in args.competitors] if args.competitors else list(COMPETITORS)
    warmup = preset.warmup if args.warmup is None else args.warmup
    steps = preset.steps if args.steps is None else args.steps
    if args.dry_run:
        print("\n".join(dry_run_lines(preset, competitors, warmup, steps)))
        return 0
    print("\n".join(describe(preset, warmup, steps)), flush=True)
    records = run(preset, competitors, "cuda" if cuda else "cpu", warmup, steps)
    from .report import record_dir

    path = write_records(records, Path(args.output) if args.output else record_dir(records[0]["device"]))
    print(table(records))
    print(f"wrote {path}")
    return 1 if any(r["status"] == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
