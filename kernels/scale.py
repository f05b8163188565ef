"""The upstream gradient applied to gradients that were finished in the forward (`impl="chunked"` and the
sparse teacher's chunked path compute them while each chunk's logits exist), read on the device."""

import triton
import triton.language as tl


@triton.jit
def scale_unless_one_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """x[i] = x[i] · s for i < n, s = scale_ptr[0], the product in ACC and rounded once to x's dtype. Every
    program reads s first and stops where s == 1 — the upstream gradient of loss.backward() — so that then the
    gradients are neither read nor written, and the host never reads s (no synchronization). Programs stride
    over the blocks: the grid is sized to the GPU, not to n; offsets are 64-bit (a weight gradient may hold
    more than 2^31 elements)."""
    s = tl.load(scale_ptr).to(ACC)
    if s != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n
            x = tl.load(x_ptr + offs, mask=ok)
            tl.store(x_ptr + offs, (x.to(ACC) * s).to(x.dtype), mask=ok)
