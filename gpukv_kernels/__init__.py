"""Triton kernels of gpukv (installed as `gpukv_kernels`); raw arguments only, no gpukv imports.

paged_copy   token rows between paged KV planes and contiguous chunks (pack and unpack), with
             ``paged_copy_ref``, its plain-torch reference
"""
