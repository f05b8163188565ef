"""What is benchmarked: one `Case` per function × divergence × shape × dtype, grouped into presets.

`QUICK` (the default without a GPU) is sized to finish in well under two minutes on two CPU cores with
every competitor; `FULL` (the default with one) sweeps the token counts and the vocabularies and hidden
sizes of real model families in bfloat16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable

import torch

KD_LOSS = "kd_loss"
FUSED = "fused_linear_kd_loss"
TOPK = "topk_kd_loss"
FUSED_TOPK = "fused_linear_topk_kd_loss"
FUNCTIONS = (KD_LOSS, FUSED, TOPK, FUSED_TOPK)
LINEAR = (FUSED, FUSED_TOPK)  # the functions that take hidden states and lm_head weights
SPARSE = (TOPK, FUSED_TOPK)  # the functions whose teacher is its top-k (ids, log-probabilities)
TOPK_KS = (1, 32, 128)
DEFAULT_DIVERGENCES = ("forward_kl", "generalized_jsd")
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


@dataclass(frozen=True)
class Case:
    """One benchmarked call. `hidden_student`/`hidden_teacher` are 0 for the functions on logits; `k` is the
    sparse teacher's top-k (0 for a dense teacher; the top-k losses run with tail="bucket")."""

    function: str
    divergence: str
    tokens: int
    vocab: int
    hidden_student: int = 0
    hidden_teacher: int = 0
    dtype: str = "float32"
    k: int = 0

    @property
    def label(self) -> str:
        """Short and unique, e.g. 'kd forward_kl 512x32000 fp32', 'fused generalized_jsd 256x32000 h256/384 fp32'
        or 'fused-topk32 forward_kl 256x32000 h256 fp32'."""
        width = ""
        if self.function == FUSED:
            width = f" h{self.hidden_student}/{self.hidden_teacher}"
        elif self.function == FUSED_TOPK:
            width = f" h{self.hidden_student}"
        short = {KD_LOSS: "kd", FUSED: "fused", TOPK: f"kd-topk{self.k}", FUSED_TOPK: f"fused-topk{self.k}"}
        return (f"{short[self.function]} {self.divergence} {self.tokens}x{self.vocab}{width} "
                f"{_SHORT_DTYPE.get(self.dtype, self.dtype)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def fields(self) -> dict:
        return asdict(self)


CASE_FIELDS = tuple(Case.__dataclass_fields__)
CASE_FIELDS_BUT_TOKENS = tuple(f for f in CASE_FIELDS if f != "tokens")


@dataclass(frozen=True)
class Preset:
    """Cases for the default divergences, plus how many timed repetitions follow how many warm-ups."""

    name: str
    shapes: tuple[Case, ...]  # divergence left as a placeholder, filled in by `cases()`
    reps: int
    warmup: int

    def cases(self, divergences: Iterable[str] = DEFAULT_DIVERGENCES) -> list[Case]:
        return [replace(shape, divergence=d) for shape in self.shapes for d in divergences]


# (vocabulary, student hidden, teacher hidden) of the model families in the issue:
# Llama-2 / Mistral, Llama-3 8B, Qwen2.5 1.5B → 7B, Gemma-2 2B → 9B.
MODEL_FAMILIES = ((32000, 4096, 4096), (128256, 4096, 4096), (151936, 1536, 3584), (256000, 2304, 3584))
FULL_TOKENS = (1024, 2048, 4096, 8192, 16384)

QUICK = Preset(
    "quick",
    (Case(KD_LOSS, "", 512, 32000), Case(FUSED, "", 256, 32000, 256, 384)),
    reps=3, warmup=1,
)
FULL = Preset(
    "full",
    tuple(Case(KD_LOSS, "", n, v, dtype="bfloat16") for v, _, _ in MODEL_FAMILIES for n in FULL_TOKENS)
    + tuple(Case(FUSED, "", n, v, hs, ht, "bfloat16") for v, hs, ht in MODEL_FAMILIES for n in FULL_TOKENS)
    + tuple(Case(f, "", 8192, 128256, 4096 if f == FUSED_TOPK else 0, 0, "bfloat16", k)
            for f in SPARSE for k in TOPK_KS),
    reps=10, warmup=3,
)
# Sparse teachers alone: `python -m bench --topk` (float32 on a CPU, bf16 at the headline shape on a GPU).
TOPK_PRESET = Preset(
    "topk",
    tuple(Case(TOPK, "", 512, 32000, k=k) for k in TOPK_KS) + tuple(Case(FUSED_TOPK, "", 256, 32000, 256, k=k)
                                                                   for k in TOPK_KS),
    reps=3, warmup=1,
)
PRESETS = {p.name: p for p in (QUICK, FULL, TOPK_PRESET)}


def parse_shape(text: str) -> tuple[int, int]:
    """'TOKENSxVOCAB' → (tokens, vocab); ValueError otherwise."""
    tokens, sep, vocab = text.lower().partition("x")
    if not sep or not tokens.isdigit() or not vocab.isdigit():
        raise ValueError(f"--shape: expected TOKENSxVOCAB such as 512x32000, got {text!r}")
    return int(tokens), int(vocab)


def select(cases: Iterable[Case], *, functions=None, shapes=None) -> list[Case]:
    """The cases whose function is in `functions` and whose (tokens, vocab) is in `shapes` (None: any)."""
    wanted = None if shapes is None else {parse_shape(s) for s in shapes}
    return [c for c in cases
            if (functions is None or c.function in functions)
            and (wanted is None or (c.tokens, c.vocab) in wanted)]
