"""The bytes: paged KV layouts described from the worker's tensors, and pack/unpack between those
pages and contiguous chunks.

layout.py       PagedKV, the descriptor (dims table, sizes, byte strides, base addresses)
copy.py         pack / unpack / validate: the public copy entry points and backend choice
copy_triton.py  PagedKV -> raw arguments of the Triton kernel ``gpukv_kernels.paged_copy``
copy_torch.py   the fast CPU path (numpy gathers of contiguous units or whole blocks)
units.py        how a layout's rows cut into contiguous units (torch path)
groups.py       planes sharing a buffer as numpy item arrays (CPU path)
planes.py       each (layer, K/V) plane as a strided byte view of the pages
"""
