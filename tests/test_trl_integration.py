"""TRL 1.16's DistillationTrainer on kdops: the drop-in for its chunked loss equals TRL's function, and the
subclass trains exactly as TRL's own trainer (losses, logged entropy, weights), with gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch

import kdops
from kdops.compat import trl as kdops_trl
from oracle import rel_error

trl = pytest.importorskip("trl")
distillation_trainer = pytest.importorskip("trl.trainer.distillation_trainer")
transformers = pytest.importorskip("transformers")

B, K, HS, HT, V = 3, 9, 16, 24, 301


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(B, K, HS, generator=g), torch.randn(B, K, HT, generator=g)
    ws, wt = torch.randn(V, HS, generator=g) * 0.6, torch.randn(V, HT, generator=g) * 0.6
    bs, bt = torch.randn(V, generator=g), torch.randn(V, generator=g)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, :3] = 0  # a prompt
    mask[2, -2:] = 0  # padding
    return hs, ht, ws, wt, bs, bt, mask


def run(fn, case, beta, **kwargs):
    hs, ht, ws, wt, bs, bt, mask = case
    hs, ws, bs = (x.clone().requires_grad_(True) for x in (hs, ws, bs))
    loss, entropy, valid = fn(hs, ht, ws, wt, mask, beta, student_lm_head_bias=bs, teacher_lm_head_bias=bt, **kwargs)
    return [loss, entropy, valid, *torch.autograd.grad(loss, (hs, ws, bs))]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("options", [
    dict(temperature=1.0),
    dict(temperature=2.0, num_items_in_batch=torch.tensor(40)),
    dict(temperature=1.5, num_items_in_batch=31, student_logit_scale=0.8, teacher_logit_scale=1.3,
         student_final_logit_softcapping=5.0, teacher_final_logit_softcapping=3.0),
], ids=["plain", "num_items", "scales_and_softcaps"])
def test_drop_in_equals_trls_chunked_loss(beta, options):
    case = inputs(seed=int(10 * beta))
    theirs = run(distillation_trainer._chunked_divergence_loss, case, beta, **options)
    ours = run(kdops_trl.chunked_divergence_loss, case, beta, **options)
    for name, t, o in zip(("loss", "entropy sum", "valid", "d hidden", "d weight", "d bias"), theirs, ours):
        if name == "valid":
            assert int(t) == int(o) == 22
            continue
        assert rel_error(o, t) < 1e-5, name  # float32 against float32: within its accuracy


def test_drop_in_takes_any_divergence_and_a_fully_masked_batch():
    case = inputs(seed=4)
    hs, ht, ws, wt, bs, bt, mask = case
    loss, entropy, valid = kdops_trl.chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, divergence="tvd",
                                                             student_lm_head_bias=bs, teacher_lm_head_bias=bt)
    keep = mask.reshape(-1) != 0
    expected = kdops.fused_linear_kd_loss(hs.reshape(-1, HS)[keep], ws, ht.reshape(-1, HT)[keep], wt,
                                          divergence="tvd", student_bias=bs, teacher_bias=bt)
    assert torch.allclose(loss, expected, rtol=1e-6)
    # no valid position: a finite zero loss, zero entropy, zero positions (as TRL's clamp)
    loss, entropy, valid = kdops_trl.chunked_divergence_loss(hs, ht, ws, wt, torch.zeros_like(mask), 0.5)
    assert float(loss) == 0.0 and float(entropy) == 0.0 and int(valid) == 0


# --- the trainer -------------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def tiny_llama(seed, hidden=32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def train(trainer_cls, student, teacher, tmp_path, **kwargs):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": [" ".join(f"w{(3 * i + j) % 61}" for j in range(5)) for i in range(16)]})
    config = trl.DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, logging_steps=1,
                                    report_to=[], save_strategy="no", use_cpu=True, max_completion_length=6, seed=0,
                                    beta=0.5, temperature=1.5)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=data,
                          processing_class=tokenizer(), **kwargs)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return [log["loss"] for log in logs], [log["entropy"] for log in logs], student


def test_subclass_trains_as_trls_own_trainer(tmp_path):
    """Three accumulated steps of on-policy distillation (in-process generation, seeded): the same losses,
    logged student entropy and weights as trl.DistillationTrainer; with another divergence it trains too."""
    from kdops.integrations.trl import DistillationTrainer

    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
    theirs = train(trl.DistillationTrainer, copy.deepcopy(student), teacher, tmp_path / "trl")
    ours = train(DistillationTrainer, copy.deepcopy(student), teacher, tmp_path / "kdops")
    assert len(ours[0]) == 3
    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(theirs[0]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ours[1]), torch.tensor(theirs[1]), rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(ours[2].named_parameters(), theirs[2].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=2e-5, msg=name)  # Adam steps of 1e-3: 2 % of one
    losses, _, _ = train(DistillationTrainer, copy.deepcopy(student), teacher, tmp_path / "tvd", divergence="tvd")
    assert len(losses) == 3 and all(0 < x < 1 for x in losses)
    assert distillation_trainer._chunked_divergence_loss is not kdops_trl.chunked_divergence_loss  # restored
