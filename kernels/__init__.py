"""Triton kernels of gpukv (installed as `gpukv_kernels`)."""
