"""Triton kernels of kdops (installed as ``kdops.kernels``). Import only after TRITON_INTERPRET is set."""
