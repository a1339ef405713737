"""Timing for the GPU sweeps: CUDA events around each call, L2 flushed before it, subjects
alternating with their baseline; and the slowdown of one stream's work while another runs.

On a CPU (a sweep's ``--dry-run``) the same calls run in the same order timed with
``perf_counter`` and streams are no-ops, so a sweep's Python runs end to end without a GPU: the
numbers then mean nothing, the code paths are what is checked.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable

import torch


class Clock:
    """Times calls on ``device``. ``flush_bytes``: the buffer written before each timed call so
    every call starts with a cold L2 (default: twice the device's L2, 8 MiB on a CPU)."""

    def __init__(self, device: torch.device | str, flush_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if flush_bytes is None:
            l2 = torch.cuda.get_device_properties(self.device).L2_cache_size if self.cuda else 4 << 20
            flush_bytes = 2 * l2
        self.scratch = torch.empty(flush_bytes, dtype=torch.uint8, device=self.device)

    def flush(self) -> None:
        self.scratch.zero_()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def alternate(self, fns: dict[str, Callable[[], object]], repeats: int,
                  warmup: int = 2) -> dict[str, list[float]]:
        """Seconds of each call of each function: within a repeat every function once (forward
        order on even repeats, reverse on odd ones), L2 flushed before each call."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        self.sync()
        names = list(fns)
        marks: dict[str, list] = {n: [] for n in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                self.flush()
                marks[name].append(self._timed(fns[name]))
        self.sync()
        return {n: [self._seconds(m) for m in marks[n]] for n in names}

    def _timed(self, fn: Callable[[], object]):
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    @staticmethod
    def _seconds(mark) -> float:
        if isinstance(mark, float):
            return mark
        start, end = mark
        return start.elapsed_time(end) / 1e3

    def stream(self):
        """A new stream (CUDA), or None on a CPU."""
        return torch.cuda.Stream(self.device) if self.cuda else None

    def on(self, stream):
        """Context that makes ``stream`` current (no-op for None)."""
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def slowdown(self, victim: Callable[[], object], aggressor: Callable[[], object], *,
                 victim_calls: int, repeats: int) -> dict[str, float]:
        """How much longer ``victim_calls`` calls of ``victim`` take on one stream while
        ``aggressor`` runs back to back on another (enough calls to cover the victim's whole
        window), alone and together in turn. Returns median seconds and ``slowdown`` =
        together / alone - 1."""
        a, b = self.stream(), self.stream()
        with self.on(b):
            aggressor_s = statistics.median(self.alternate({"x": aggressor}, 3)["x"])
        alone, together = [], []
        for _ in range(repeats):
            with self.on(a):
                alone.append(self._window(victim, victim_calls))
            self.sync()
            count = math.ceil(1.5 * statistics.median(alone) / max(aggressor_s, 1e-9)) + 2
            with self.on(b):
                for _ in range(count):
                    aggressor()
            with self.on(a):
                together.append(self._window(victim, victim_calls))
            self.sync()
        t_alone, t_together = statistics.median(alone), statistics.median(together)
        return dict(victim_s=t_alone, victim_with_aggressor_s=t_together,
                    aggressor_s=aggressor_s, slowdown=t_together / t_alone - 1)

    def _window(self, fn: Callable[[], object], calls: int) -> float:
        """Seconds from before the first to after the last of ``calls`` calls on the current
        stream (events on that stream; the host does not wait in between)."""
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
