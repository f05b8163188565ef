"""kdops.integrations.transformers: the loss from decoder hidden states equals the reference on full
logits, for tiny random Llama models (and Cohere / Granite / Gemma-2 for logit post-processing)."""

import copy

import pytest
import torch

import kdops.divergences
import kdops.torch_math
from kdops.integrations import transformers as kd_tf

transformers = pytest.importorskip("transformers")

VOCAB = 311


def tiny(cls_name="Llama", hidden=32, layers=2, vocab=VOCAB, seed=0, **extra):
    torch.manual_seed(seed)
    config = getattr(transformers, f"{cls_name}Config")(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return getattr(transformers, f"{cls_name}ForCausalLM")(config)


def batch(seed=1, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 19), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    mask = torch.ones_like(ids)
    if padded:
        mask[2, -4:] = 0
        labels[2, -4:] = -100
    return dict(input_ids=ids, labels=labels, attention_mask=mask)


def reference_loss(student, teacher, b, divergence="forward_kl", temperature=1.0, hard_weight=0.0,
                   soft_weight=1.0, num_items_in_batch=None):
    """On full logits: the divergence of logits[:, :-1] masked by labels[:, 1:], plus the causal LM CE."""
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    mask = labels != -100
    divergence = kdops.divergences.as_divergence(divergence)
    rows = soft_weight * kdops.torch_math.divergence_rows(divergence, s, t, temperature)
    if hard_weight:
        ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]).float(), labels.reshape(-1),
                                               reduction="none").view(labels.shape)
        rows = rows + hard_weight * ce
    total = torch.where(mask, rows, 0.0).sum()
    return total / (mask.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch)


def _loss_and_grads(fn, student, *args, **kwargs):
    student.zero_grad()
    loss = fn(student, *args, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=2e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("divergence, hard_weight, temperature", [
    ("forward_kl", 0.0, 1.0), ("reverse_kl", 0.5, 2.0), ("generalized_jsd", 0.3, 1.5), ("tvd", 0.0, 1.0),
])
def test_matches_reference_on_full_logits(divergence, hard_weight, temperature):
    student, teacher = tiny(seed=0), tiny(hidden=48, layers=3, seed=1)
    b = batch()
    options = dict(divergence=divergence, hard_weight=hard_weight, temperature=temperature, soft_weight=0.8)
    _assert_same(_loss_and_grads(kd_tf.distillation_loss, student, teacher, b, **options),
                 _loss_and_grads(reference_loss, student, teacher, b, **options))


def test_num_items_in_batch_and_tied_embeddings():
    student = tiny(seed=2, tie_word_embeddings=True)
    teacher = tiny(hidden=48, seed=3)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    b = batch(seed=4)
    _assert_same(_loss_and_grads(kd_tf.distillation_loss, student, teacher, b, num_items_in_batch=100),
                 _loss_and_grads(reference_loss, student, teacher, b, num_items_in_batch=100))


def test_decoders_run_without_a_key_value_cache():
    """Both models' decoders are called with use_cache=False: no layer's keys and values are kept for the loss."""
    student, teacher = tiny(seed=2), tiny(hidden=48, seed=3)
    seen = []
    for model in (student, teacher):
        model.get_decoder().register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("use_cache")),
                                                      with_kwargs=True)
    kd_tf.distillation_loss(student, teacher, batch(seed=4)).backward()
    assert seen == [False, False]


def test_label_shift():
    labels = torch.tensor([[5, 6, 7], [-100, 8, 9]])
    assert kd_tf.shift_labels(labels).tolist() == [[6, 7, -100], [8, 9, -100]]


@pytest.mark.parametrize("family, option, value", [("Cohere", "logit_scale", 0.5), ("Granite", "logits_scaling", 4.0)])
def test_logit_multipliers_are_folded_in(family, option, value):
    student = tiny(family, seed=5, **{option: value})
    teacher = tiny(family, hidden=48, seed=6, **{option: value})
    assert kd_tf.logit_multiplier(student) != 1.0
    b = batch(seed=7)
    _assert_same(_loss_and_grads(kd_tf.distillation_loss, student, teacher, b, hard_weight=0.5),
                 _loss_and_grads(reference_loss, student, teacher, b, hard_weight=0.5))


def gemma2(seed, hidden=32, softcap=0.3):
    """A tiny Gemma-2 whose final-logit softcap bites: its random logits reach about ±0.45, so a cap of 0.3
    is far from the identity."""
    return tiny("Gemma2", hidden=hidden, seed=seed, head_dim=8, final_logit_softcapping=softcap)


def test_softcapped_models_match_reference():
    """Gemma-2 students and teachers with final_logit_softcapping: the caps are read from the configs and
    applied by the kernels, and the loss and gradients equal those of the models' own (softcapped) logits."""
    student, teacher = gemma2(seed=8, softcap=0.3), gemma2(seed=9, hidden=48, softcap=0.5)
    assert kd_tf.logit_transform(student) == (1.0, 0.3) and kd_tf.logit_softcap(teacher) == 0.5
    b = batch(seed=10)
    for options in (dict(divergence="generalized_jsd", hard_weight=0.5, temperature=1.5),
                    dict(divergence="reverse_kl", impl="fused", backend="triton")):
        reference_options = {k: v for k, v in options.items() if k not in ("impl", "backend")}
        _assert_same(_loss_and_grads(kd_tf.distillation_loss, student, teacher, b, **options),
                     _loss_and_grads(reference_loss, student, teacher, b, **reference_options))
    # A plain student against a softcapped teacher: only the teacher's side is capped.
    plain = tiny(seed=11)
    _assert_same(_loss_and_grads(kd_tf.distillation_loss, plain, teacher, b),
                 _loss_and_grads(reference_loss, plain, teacher, b))


def test_unknown_logit_option_is_a_clear_error():
    teacher = tiny(seed=8)
    teacher.config.logit_bias_magic = 3.0
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*logit_bias_magic.*kd_loss"):
        kd_tf.distillation_loss(tiny(seed=9), teacher, batch())


def test_peft_wrapped_student():
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(tiny(seed=10), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    teacher = tiny(hidden=48, seed=11)
    b = batch(seed=12)
    _assert_same(_loss_and_grads(kd_tf.distillation_loss, student, teacher, b),
                 _loss_and_grads(reference_loss, student, teacher, b))


def _train(trainer_cls, student, teacher, steps, tmp_path, **kwargs):
    data = [batch(seed=20 + i, padded=False) for i in range(steps * 2)]
    dataset = [{k: v[0] for k, v in d.items()} for d in data]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-3,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          dataloader_num_workers=0, seed=0)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=dataset, **kwargs)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], student


def test_trainer_steps_match_a_full_logits_trainer(tmp_path):
    """A few optimizer steps with gradient accumulation: same logged losses and same weights as a Trainer
    whose loss is computed on full logits."""
    student, teacher = tiny(seed=13), tiny(hidden=48, seed=14)
    Trainer = kd_tf.DistillationTrainer

    class FullLogitsTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            options = {k: v for k, v in self.distillation_options.items() if k != "impl"}
            return reference_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                  **options)

    ours, s1 = _train(Trainer, copy.deepcopy(student), teacher, 3, tmp_path / "a", hard_weight=0.5)
    theirs, s2 = _train(FullLogitsTrainer, copy.deepcopy(student), teacher, 3, tmp_path / "b", hard_weight=0.5)
    assert len(ours) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-4)
    for (n, p), (_, q) in zip(s1.named_parameters(), s2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=n)


def test_softcapped_gemma2_trainer_matches_full_logits(tmp_path):
    """DistillationTrainer on softcapped Gemma-2 models: the same logged losses and weights after three
    accumulated steps as a Trainer on the models' full (softcapped) logits."""
    student, teacher = gemma2(seed=18, softcap=0.3), gemma2(seed=19, hidden=48, softcap=0.5)
    ours, s1 = _train(kd_tf.DistillationTrainer, copy.deepcopy(student), teacher, 3, tmp_path / "a",
                      divergence="generalized_jsd", hard_weight=0.5)
    theirs, s2 = _train(_full_logits_trainer(), copy.deepcopy(student), teacher, 3, tmp_path / "b",
                        divergence="generalized_jsd", hard_weight=0.5)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-4)
    for (n, p), (_, q) in zip(s1.named_parameters(), s2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=n)


def test_taid_trainer(tmp_path):
    """DistillationTrainer(taid=TAIDSchedule(...)): each step's loss is TAID at the schedule's t (the same
    losses and weights as a full-logits Trainer driven by its own copy of the schedule), t moves after every
    optimizer step by the schedule's rule applied to the step's loss, and is logged as taid_t."""
    import kdops

    student, teacher = tiny(seed=21), tiny(hidden=48, seed=22)
    ours_schedule = kdops.TAIDSchedule(t_start=0.4, alpha=0.2, num_steps=10)
    theirs_schedule = kdops.TAIDSchedule(t_start=0.4, alpha=0.2, num_steps=10)
    ours, s1 = _train(kd_tf.DistillationTrainer, copy.deepcopy(student), teacher, 3, tmp_path / "a",
                      taid=ours_schedule, hard_weight=0.3)
    theirs, s2 = _train(_full_logits_trainer(), copy.deepcopy(student), teacher, 3, tmp_path / "b",
                        taid=theirs_schedule, hard_weight=0.3)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-4)
    for (n, p), (_, q) in zip(s1.named_parameters(), s2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=n)
    # The schedule saw the three logged step losses, in order.
    replay = kdops.TAIDSchedule(t_start=0.4, alpha=0.2, num_steps=10)
    ts = [replay.update(loss, step=i + 1) for i, loss in enumerate(ours)]
    assert ours_schedule.step == 3 and ours_schedule.t == pytest.approx(ts[-1], rel=1e-3)
    assert ts[-1] > 0.4
    with pytest.raises(ValueError, match="divergence"):
        _train(kd_tf.DistillationTrainer, copy.deepcopy(student), teacher, 1, tmp_path / "c",
               taid=ours_schedule, divergence="reverse_kl")


def _full_logits_trainer():
    """DistillationTrainer with its loss computed on the models' full logits by the reference (the TAID
    schedule, when given, is driven the same way)."""

    class FullLogitsTrainer(kd_tf.DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            options = {k: v for k, v in self.distillation_options.items() if k != "impl"}
            if self.taid is not None:
                options["divergence"] = self.taid.divergence
            loss = reference_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                  **options)
            if self.taid is not None:
                self._taid_losses.append((loss.detach(), num_items_in_batch is not None))
            return loss

    return FullLogitsTrainer


def test_bf16_teacher_and_autocast_student():
    """Mixed precision: the student under CPU autocast (bf16 hidden states, fp32 lm_head), the teacher in
    bfloat16; the same loss as the reference on full logits computed the same way, to bf16 accuracy."""
    student, teacher = tiny(seed=15), tiny(hidden=48, seed=16).to(torch.bfloat16)
    b = batch(seed=17)

    def under_autocast(fn):
        def run(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args, **kwargs).float()
        return run

    ours = _loss_and_grads(under_autocast(kd_tf.distillation_loss), student, teacher, b, hard_weight=0.5)
    theirs = _loss_and_grads(under_autocast(reference_loss), student, teacher, b, hard_weight=0.5)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-2, atol=2e-2)
    for name in ours[1]:
        g, h = ours[1][name], theirs[1][name]
        assert float((g - h).norm() / h.norm().clamp_min(1e-12)) < 5e-2, name


def ddp_distillation_body(rank, world_size):
    """Each rank distills on its half of a batch through a DDP-wrapped student: DDP's forward must run, or
    the gradients are never averaged; the averaged gradients equal one process's on the full batch."""
    from torch.nn.parallel import DistributedDataParallel

    from oracle import rel_error

    student, teacher = tiny(seed=0), tiny(hidden=48, seed=1)
    plain = copy.deepcopy(student)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (4, 11), generator=g)
    full = dict(input_ids=ids, labels=ids.clone())  # every half has the same number of predicted tokens
    half = {k: v.chunk(world_size)[rank] for k, v in full.items()}
    options = dict(divergence="generalized_jsd", hard_weight=0.4, backend="torch")

    kd_tf.distillation_loss(plain, teacher, full, **options).backward()
    ddp = DistributedDataParallel(student)
    kd_tf.distillation_loss(ddp, teacher, half, **options).backward()
    for (name, got), want in zip(student.named_parameters(), plain.parameters()):
        assert rel_error(got.grad, want.grad) < 1e-5, f"{name}: not the full batch's gradient"


def test_ddp_student_gradients_are_averaged():
    from spawn import spawn

    spawn(ddp_distillation_body, 2)
