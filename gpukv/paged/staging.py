"""Getting a copy's small per-call tensors (slot mappings, chunk offsets) onto the pages' device
without making the host wait, and fencing the copy afterwards.

A pageable host->device copy is synchronous: it waits for everything already queued on the
stream (the engine's forward), which defeats an engine that prepares step N+1 on the CPU while
the GPU runs step N. So a CPU tensor bound for a GPU goes through pinned host memory and a
non-blocking copy on the *current* stream, where the copy kernel that reads it runs next. The
pinned block comes from torch's caching host allocator, which records the copy's stream on it:
the block is not handed out again before that copy has run, even once the tensor is dropped.

:class:`Fence` is the one wait of a copy: an event recorded on the stream after the kernel, and
waited for only before the books are told the copy is over (a commit, the end of a retrieve, or
an error path giving slots back). On CPU everything is synchronous and a fence is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: itself where it is there already (or ``device`` is a CPU), else a
    non-blocking copy on ``device``'s current stream (through pinned memory from a CPU tensor).
    Call it under :func:`on_device` so the copy is queued where the kernel will run."""
    if device.type != "cuda" or t.device == device:
        return t
    if t.device.type == "cpu" and not t.is_pinned():
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        t = pinned
    return t.to(device, non_blocking=True)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A device guard for a CUDA ``device`` (Triton launches on the *current* device, and
    ``current_stream()`` means the current device's stream), else a no-op."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class Fence:
    """The completion of the work queued so far on ``device``'s current stream (CUDA: an event;
    CPU: already complete). Record it right after a copy is queued."""

    __slots__ = ("_event",)

    def __init__(self, device: torch.device) -> None:
        self._event = None
        if device.type == "cuda":
            with on_device(device):
                self._event = torch.cuda.Event()
                self._event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        """Whether the fenced work has completed (never blocks)."""
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Block until the fenced work has completed."""
        if self._event is not None:
            self._event.synchronize()


@contextlib.contextmanager
def fenced_on_error(device: torch.device) -> Iterator[None]:
    """Run a block that queues copies; if it raises, wait for whatever it queued before the
    error propagates (the caller gives slots back next: no kernel may still touch them)."""
    try:
        yield
    except BaseException:
        Fence(device).wait()
        raise
