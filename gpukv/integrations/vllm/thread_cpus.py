"""The CPUs a vLLM worker's gpukv threads run on (``gpukv.worker_cpus``).

vLLM-CPU binds each worker's OpenMP threads -- the forward -- one per core
(``vllm/utils/ompmultiprocessing.py``): it hands the worker its core list in the OpenMP
runtime's variables (``KMP_AFFINITY``'s ``proclist`` for Intel's runtime, ``GOMP_CPU_AFFINITY``
for GNU's, else ``OMP_PLACES``) and binds from the worker's main thread. A thread inherits the
mask of the thread that starts it, so gpukv's copy, ping and socket threads would share the
forward's first core, and every store copy would be time taken from the forward. vLLM keeps
cores out of that binding: one for its own processes (the scheduler, which every step waits
for, and the API server), one more "for nixl_connector" whenever a KV connector is configured
(``VLLM_CPU_NUM_OF_RESERVED_CPU`` overrides the count); its own NixlConnector moves its
transfers to the last core of each NUMA node (``os.sched_setaffinity`` in
``nixl/base_worker.py``).

gpukv does the same. ``"auto"`` (the default) places its worker threads on the CPUs the worker
may use that no OpenMP thread of the engine is bound to, but the first of them: that one is left
to vLLM's own processes. The CPUs it may use are its parent's mask (the engine process that chose
the binding); the engine's OpenMP threads are this worker's and its sibling workers' (the other
ranks on this host: same parent, their binding read from their environment). Engines that share
a host without a CPU set each (``taskset``, a container's cpuset) do not see each other's
bindings: give such engines ``gpukv.worker_cpus`` explicitly, or ``"inherit"``. With fewer than 2 free CPUs the threads stay where they are started: when the engine
binds nothing (GPU platforms, ``VLLM_CPU_OMP_THREADS_BIND=nobind``), when it leaves no core free
(2 cores with a connector), and when the one free core runs vLLM's scheduler. Measured on 2
cores with ``VLLM_CPU_NUM_OF_RESERVED_CPU=1``, moving the threads to that core cost more TPOT than
sharing the forward's (``perf/results/cpu/sweep_vllm_bench_quick_random_arms_cpus*``).
``"inherit"`` never moves them; a CPU list (``[1, 3]`` or ``"1,3-4"``) names the CPUs.

A placement that cannot be applied (a CPU the worker may not use) is logged and the threads stay
where they are: a gpukv setting never stops an engine from starting. Nothing here imports vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Iterator, Mapping

log = logging.getLogger(__name__)

SETTINGS = ("auto", "inherit")


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU ids of ``"0,2-4"`` (also ``"0 1"``, ``"{0,1}"``, and ``a-b:stride`` as GNU OpenMP
    writes it); ValueError naming the text for anything else."""
    cpus: set[int] = set()
    for item in re.split(r"[\s,]+", text.strip().strip("{}[]").replace("},{", ",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", item)
        if m is None:
            raise ValueError(f"not a CPU list: {text!r} (item {item!r})")
        first, last, stride = int(m[1]), int(m[2] or m[1]), int(m[3] or 1)
        if last < first or stride < 1:
            raise ValueError(f"not a CPU list: {text!r} (item {item!r})")
        cpus.update(range(first, last + 1, stride))
    if not cpus:
        raise ValueError(f"not a CPU list: {text!r} (no CPU)")
    return frozenset(cpus)


def bound_cpus(env: Mapping[str, str]) -> frozenset[int] | None:
    """The cores the engine binds this worker's OpenMP threads to, read from the variables
    vLLM-CPU sets for its OpenMP runtime; None when it binds nothing (or writes a form this
    does not read: logged)."""
    try:
        kmp = env.get("KMP_AFFINITY", "")
        m = re.search(r"proclist=\[([^\]]*)\]", kmp)
        if m:
            return parse_cpu_list(m[1])
        if env.get("GOMP_CPU_AFFINITY", "").strip():
            return parse_cpu_list(env["GOMP_CPU_AFFINITY"])
        places = env.get("OMP_PLACES", "").strip()
        if places.startswith("{"):
            return parse_cpu_list(places)
    except ValueError as exc:
        log.warning("gpukv: cannot read the engine's OpenMP binding (%s); gpukv's worker threads "
                    "stay where they start", exc)
    return None


def choose(setting: str | frozenset[int], bound: frozenset[int] | None, allowed: frozenset[int],
           others: frozenset[int] = frozenset()) -> tuple[frozenset[int] | None, str]:
    """(the CPUs for gpukv's worker threads or None: leave them where they start, why);
    ``bound``: this worker's OpenMP cores, ``others``: its sibling workers'."""
    if setting == "inherit":
        return None, "gpukv.worker_cpus is \"inherit\""
    if setting == "auto":
        if bound is None:
            return None, "the engine binds no OpenMP threads"
        bound = bound | others
        free = sorted(allowed - bound)
        if len(free) < 2:
            return None, (f"the engine keeps {len(free)} of the CPUs it may use {sorted(allowed)} free of "
                          f"its OpenMP threads, and the first is left to its own processes "
                          f"(VLLM_CPU_NUM_OF_RESERVED_CPU >= 2 keeps one more)")
        return frozenset(free[1:]), (f"the CPUs the engine keeps free of its OpenMP threads "
                                     f"{sorted(bound)}, but {free[0]}, left to its own processes")
    if not setting <= allowed:
        return None, (f"gpukv.worker_cpus {sorted(setting)} names CPUs this worker may not use "
                      f"(it may use {sorted(allowed)})")
    return frozenset(setting), "gpukv.worker_cpus"


def sibling_bound(parent: int | None = None, me: int | None = None) -> frozenset[int]:
    """The cores the OpenMP threads of ``parent``'s other children (default: this process's
    siblings, the engine's other workers on this host) are bound to, read from their
    environment (``/proc/PID/environ``: fixed when each started); an unreadable one adds
    nothing."""
    parent = os.getppid() if parent is None else parent
    me = os.getpid() if me is None else me
    out: set[int] = set()
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]
    except OSError:  # no /proc here
        return frozenset()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                items = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        env = dict(item.split("=", 1) for item in items if "=" in item)
        out |= bound_cpus(env) or frozenset()
    return frozenset(out)


def allowed_cpus() -> frozenset[int]:
    """The CPUs this worker may use: its parent's mask (the engine process that chose the
    binding, before the worker's threads were bound), else this thread's."""
    with contextlib.suppress(OSError):
        return frozenset(os.sched_getaffinity(os.getppid()))
    return frozenset(os.sched_getaffinity(0))


class ThreadCpus:
    """Where this process's gpukv threads run: :meth:`enter` on a thread moves it (a pool's
    initializer), :meth:`starting` moves the calling thread only while threads it starts are
    created (they inherit its mask: a socket's I/O thread, a ping thread). ``cpus`` None:
    nothing moves."""

    def __init__(self, cpus: frozenset[int] | None = None, why: str = "") -> None:
        self.cpus = cpus
        self.why = why

    @classmethod
    def for_worker(cls, setting: str | frozenset[int], env: Mapping[str, str] | None = None,
                   allowed: frozenset[int] | None = None) -> "ThreadCpus":
        """The placement for this worker process (logged once); nothing moves where the
        platform has no thread affinity."""
        env = os.environ if env is None else env
        if not hasattr(os, "sched_setaffinity"):
            cpus, why = None, "this platform sets no thread affinity"
        else:
            try:
                bound = bound_cpus(env)
                others = sibling_bound() if setting == "auto" and bound is not None else frozenset()
                cpus, why = choose(setting, bound, allowed_cpus() if allowed is None else allowed, others)
            except Exception as exc:  # noqa: BLE001 - a placement never stops an engine from starting
                cpus, why = None, f"reading the CPUs raised {type(exc).__name__}: {exc}"
        if cpus is None:
            log.info("gpukv: worker threads stay on the CPUs they start on (%s)", why)
        else:
            log.info("gpukv: worker threads run on CPUs %s (%s)", sorted(cpus), why)
        return cls(cpus, why)

    def enter(self) -> None:
        """Move the calling thread onto :attr:`cpus` (nothing if None or if the system refuses:
        logged, and the placement is dropped)."""
        if self.cpus is None:
            return
        try:
            os.sched_setaffinity(0, self.cpus)
        except OSError as exc:
            log.warning("gpukv: cannot move a worker thread to CPUs %s (%s); gpukv's threads stay "
                        "where they start", sorted(self.cpus), exc)
            self.cpus = None

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Run the block on :attr:`cpus`, then give the calling thread its own mask back."""
        if self.cpus is None:
            yield
            return
        mine = os.sched_getaffinity(0)
        self.enter()
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)
