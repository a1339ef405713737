"""CPU seconds each process and thread of a benchmark arm used (who took the machine's cores).

:func:`thread_cpu` samples user + system seconds of every thread of named root processes and
all their descendants: a root's own threads count under its label, a descendant's under its
process name (vLLM names its engine ``VLLM::EngineCore`` and its workers ``VLLM::Worker``).
Two samples' difference (:func:`cpu_between`) says how much of the machine each role took in
between, :func:`machine_busy` what the whole machine used (the rest of it is other users'
work on a shared machine), and :func:`busy_threads` how many of a role's threads computed (e.g. a vLLM-CPU
worker's OpenMP threads: vLLM binds one per core it gives the worker). psutil is installed
with vLLM, which every caller of this module runs.
"""

from __future__ import annotations

import psutil


MAIN = "/main"  # a process's main thread's role: its role and this (a vLLM worker's forward)


def thread_cpu(roots: dict[str, int]) -> dict[tuple[str, int], float]:
    """``{(role, thread id): cpu seconds}`` of ``roots`` (``{label: pid}``) and their
    descendants now; a process that is gone counts nothing. A process's main thread has its
    role plus :data:`MAIN` (sums by role prefix count it with the rest)."""
    out: dict[tuple[str, int], float] = {}
    for label, pid in roots.items():
        try:
            root = psutil.Process(pid)
            procs = [(label, root)] + [(None, child) for child in root.children(recursive=True)]
        except psutil.Error:
            continue
        for role, proc in procs:
            try:
                role = role or proc.name()
                for thread in proc.threads():
                    out[(role + MAIN if thread.id == proc.pid else role, thread.id)] = (
                        thread.user_time + thread.system_time)
            except psutil.Error:
                continue
    return out


def cpu_between(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float]) -> dict[str, float]:
    """Seconds each role used between two samples (a thread only in ``after`` counts all of it)."""
    out: dict[str, float] = {}
    for key, seconds in after.items():
        out[key[0]] = out.get(key[0], 0.0) + seconds - before.get(key, 0.0)
    return out


def busy_threads(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], prefix: str,
                 min_s: float) -> int:
    """How many threads of roles starting with ``prefix`` used at least ``min_s`` seconds."""
    return sum(1 for key, seconds in after.items()
               if key[0].startswith(prefix) and seconds - before.get(key, 0.0) >= min_s)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, all but idle and I/O wait)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)
