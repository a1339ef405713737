"""Triton kernels of gpukv (installed as `gpukv_kernels`); raw arguments only, no gpukv imports.

paged_copy       token rows between paged KV planes and contiguous chunks (pack and unpack), with
                 ``paged_copy_ref``, its plain-torch reference
paged_copy_plan  the launch plan of paged_copy (vector width, tiling, grid = the SM budget):
                 one function, used by the launcher and by the CPU test of the compiled kernel
cubin            compile a launch for sm_90a / sm_100a without a GPU and read its cubin
"""
