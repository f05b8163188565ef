"""Distill a small language model from a larger one, end to end on a CPU, with no downloads.

    python examples/distill_markov.py            # about a minute on two CPU cores
    python examples/distill_markov.py --quick    # a few seconds (a smoke test)

1. A synthetic language with real structure: a random Markov chain over V tokens in which each token
   has a handful of likely successors (so the true next-token distributions are peaked, like an LM's).
2. A teacher (a tiny Llama built from a config, random init) trained on labels from that language.
3. Two students, smaller than the teacher, trained for the same steps on the same batches: one on the
   labels alone, one distilled from the teacher with `kdops.integrations.transformers.DistillationTrainer`
   (forward KL on the teacher's full distribution, plus a little of the label loss).
4. Held-out perplexity of each model, next to the chain's own (the best any model can do), and each
   student's KL to the teacher.
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

from kdops.integrations.transformers import DistillationTrainer

VOCAB = 96


def markov_chain(vocab: int, successors: int, generator) -> torch.Tensor:
    """A [V, V] transition matrix: each token has `successors` likely next tokens, the rest a little mass."""
    logits = torch.full((vocab, vocab), -4.0)
    for token in range(vocab):
        nxt = torch.randperm(vocab, generator=generator)[:successors]
        logits[token, nxt] = torch.randn(successors, generator=generator) * 1.5 + 2.0
    return logits.softmax(-1)


def sample(chain: torch.Tensor, n: int, length: int, generator) -> torch.Tensor:
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, chain.shape[0], (n,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=generator)[:, 0]
    return tokens


def chain_perplexity(chain: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp of the mean −log P(next | current) under the true chain: the floor for every model."""
    nll = -chain[tokens[:, :-1], tokens[:, 1:]].log().mean()
    return math.exp(float(nll))


def tiny_llama(hidden: int, layers: int, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def dataset(tokens: torch.Tensor) -> list[dict]:
    return [{"input_ids": row, "labels": row.clone()} for row in tokens]


def train(model, tokens, steps, teacher=None, seed=0, **distillation):
    """`steps` optimizer steps of batch 32 on `tokens`: plain Trainer on labels, or DistillationTrainer."""
    args = transformers.TrainingArguments(output_dir="/tmp/kdops-example", per_device_train_batch_size=32,
                                          max_steps=steps, learning_rate=3e-3, warmup_steps=steps // 10,
                                          lr_scheduler_type="cosine", logging_steps=max(1, steps // 4),
                                          report_to=[], save_strategy="no", use_cpu=True, seed=seed,
                                          disable_tqdm=True, dataloader_num_workers=0)
    if teacher is None:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(tokens))
    else:
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=dataset(tokens),
                                      **distillation)
    trainer.train()
    return model.eval()


@torch.no_grad()
def evaluate(model, tokens, teacher=None) -> dict:
    """Held-out perplexity, and the mean KL(teacher ‖ model) per predicted token."""
    logits = model(tokens).logits[:, :-1].float()
    log_q = logits.log_softmax(-1)
    nll = -log_q.gather(-1, tokens[:, 1:, None]).mean()
    result = {"perplexity": math.exp(float(nll))}
    if teacher is not None:
        log_p = teacher(tokens).logits[:, :-1].float().log_softmax(-1)
        result["kl_to_teacher"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: checks that everything runs")
    args = parser.parse_args(argv)
    steps, n_train = (4, 256) if args.quick else (300, 4096)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    chain = markov_chain(VOCAB, successors=4, generator=g)
    train_tokens, test_tokens = sample(chain, n_train, 32, g), sample(chain, 256, 32, g)

    teacher = train(tiny_llama(hidden=96, layers=2, seed=1), train_tokens, steps)
    label_student = train(tiny_llama(hidden=32, layers=1, seed=2), train_tokens, steps)
    distilled = train(tiny_llama(hidden=32, layers=1, seed=2), train_tokens, steps, teacher=teacher,
                      divergence="forward_kl", hard_weight=0.1, soft_weight=0.9)

    results = {"chain (the floor)": {"perplexity": chain_perplexity(chain, test_tokens)},
               "teacher": evaluate(teacher, test_tokens),
               "student, labels only": evaluate(label_student, test_tokens, teacher),
               "student, distilled": evaluate(distilled, test_tokens, teacher)}
    print(f"\n{'model':24} {'held-out ppl':>12} {'KL to teacher':>14}")
    for name, r in results.items():
        kl = f"{r['kl_to_teacher']:14.4f}" if "kl_to_teacher" in r else f"{'':14}"
        print(f"{name:24} {r['perplexity']:12.3f} {kl}")
    return results


if __name__ == "__main__":
    main()
