"""Correctness of fused_linear_kd_loss at a real size on a GPU, against the reference in float32.

    python -m bench.fused_check [--tokens 8192 --hs 2048 --ht 4096 --vocab 151936] [--output FILE]

bf16 inputs; for each impl, the relative error (max |Δ| / max |reference|) of the loss and of every
gradient (student hidden and weight; teacher frozen), with the time and peak memory of forward + backward.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kdops


def _inputs(n, hs, ht, vocab, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = dict(student_hidden=torch.randn(n, hs, device=device, generator=g),
             student_weight=torch.randn(vocab, hs, device=device, generator=g) * (4 * hs ** -0.5),
             teacher_hidden=torch.randn(n, ht, device=device, generator=g),
             teacher_weight=torch.randn(vocab, ht, device=device, generator=g) * (4 * ht ** -0.5))
    x = {k: v.bfloat16() for k, v in x.items()}
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    labels[::5] = -100
    return x, labels


def _run(fn, x, labels, **options):
    inputs = {k: v.detach().clone().requires_grad_(k.startswith("student")) for k, v in x.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = fn(**inputs, labels=labels, **options)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = [inputs["student_hidden"].grad, inputs["student_weight"].grad]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    return [loss.detach().float(), *grads], seconds, extra


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hs", type=int, default=2048)
    parser.add_argument("--ht", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--divergence", nargs="+", default=["forward_kl", "generalized_jsd"])
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    x, labels = _inputs(args.tokens, args.hs, args.ht, args.vocab, "cuda")
    records = []
    for divergence in args.divergence:
        options = dict(divergence=divergence, hard_weight=0.5, temperature=2.0)
        want, ref_s, ref_extra = _run(kdops.reference.fused_linear_kd_loss, x, labels, **options)
        for impl in ("chunked", "fused"):
            _run(kdops.fused_linear_kd_loss, x, labels, impl=impl, **options)  # compile
            got, seconds, extra = _run(kdops.fused_linear_kd_loss, x, labels, impl=impl, **options)
            errors = [float((g.float() - w.float()).abs().max() / w.float().abs().max()) for g, w in zip(got, want)]
            record = dict(divergence=divergence, impl=impl, tokens=args.tokens, hs=args.hs, ht=args.ht,
                          vocab=args.vocab, err_loss=errors[0], err_grad_hidden=errors[1],
                          err_grad_weight=errors[2], seconds=seconds, extra_mib=extra / 2**20,
                          reference_seconds=ref_s, reference_extra_mib=ref_extra / 2**20,
                          device=torch.cuda.get_device_name())
            print(json.dumps(record), flush=True)
            records.append(record)
        del want
    if args.output:
        with open(args.output, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
