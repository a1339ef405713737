"""The bytes: paged KV layouts described from the worker's tensors, and pack/unpack between those
pages and contiguous chunks (Triton kernels in ``gpukv_kernels``, a fast torch path on CPU, and a
per-token reference)."""
