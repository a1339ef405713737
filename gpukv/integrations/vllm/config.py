"""The connector's settings: ``kv_connector_extra_config`` keys, validated once.

==========================  =======  =========================================================
key                         default  meaning
==========================  =======  =========================================================
``gpukv.address``           None     the ``gpukv serve`` address (``ipc://PATH`` or
                                     ``tcp://HOST:PORT``); None: the per-user default ipc address
``gpukv.autostart``         (1)      start a ``gpukv serve`` at the address when none answers
                                     ((1): True when no address is given, else False);
                                     one per address, under a lock file (see :mod:`.autostart`)
``gpukv.autostart_args``    []       extra ``gpukv serve`` arguments for an autostarted server,
                                     e.g. ``["--capacity", "8GiB", "--disk-dir", "/var/gpukv"]``
``gpukv.chunk_size``        None     if set, the server's chunk size must equal it (else the
                                     engine does not start); autostart passes it on
``gpukv.group``             None     the group secret (16-128 chars) shared by the engine's
                                     processes; None: derived from vLLM's ``engine_id`` and the
                                     data-parallel rank
``gpukv.timeout_s``         10.0     per-request client timeout; after a timeout the connector
                                     leaves the server alone for ``guard.RETRY_S`` seconds (no
                                     lookups, loads or stores meanwhile: the engine runs uncached)
``gpukv.step_budget_s``     0.02     the most one scheduler step waits for the server's answers
                                     (lookups run on a thread of their own, see :mod:`.calls`)
``gpukv.lookup_wait_s``     1.0      a request whose lookup is not answered within this long
                                     goes on without gpukv (meanwhile it waits: vLLM's "ask
                                     again later")
``gpukv.relookup_s``        5.0      a request still waiting for blocks after this many seconds
                                     is looked up again (its shares are topped up, not added)
``gpukv.events_address``    None     not used any more (a warning says so): gpukv's blocks reach
                                     vLLM's KV events through the server connection when the
                                     server runs with ``--vllm-events`` (see :mod:`.events`)
``gpukv.load_mode``         "sync"   ``"sync"``: loads are in before the forward;
                                     ``"layerwise"``: each layer waits for its own slices
                                     (``wait_for_layer_load``); ``"async"``: vLLM's asynchronous
                                     loads (the request waits while the workers load it);
                                     a model with several KV cache groups always loads
                                     asynchronously (:meth:`ConnectorConfig.for_groups`)
``gpukv.store_mode``        "async"  ``"async"``: the copies run beside the next steps, a finished
                                     request's blocks fenced until they are copied out;
                                     ``"sync"``: a step returns once its chunks are copied out of
                                     vLLM's blocks (commits follow on a thread)
``gpukv.wait_budget_s``     0.02     the most one worker step waits for the server before a load
                                     it needs starts (then it is cancelled: vLLM recomputes it)
``gpukv.worker_cpus``       "auto"   the CPUs a worker's gpukv threads (copies, pings, sockets)
                                     run on: ``"auto"``: those vLLM-CPU keeps free of its
                                     OpenMP threads but the first (its own processes'), when
                                     2 or more are free; ``"inherit"``: where they start (the
                                     forward's first core on vLLM-CPU); or a CPU list, ``[1, 3]``
                                     or ``"1,3-4"`` (see :mod:`.thread_cpus`)
==========================  =======  =========================================================

Keys of other prefixes are ignored (the tests' recording connector reads ``gpukv_test.*``).

vLLM's ``kv_role`` decides the direction: ``kv_both`` loads and stores, ``kv_producer`` only
stores, ``kv_consumer`` only loads. No module-level state; nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from gpukv.integrations.vllm.thread_cpus import SETTINGS, parse_cpu_list

log = logging.getLogger(__name__)

_KEYS = ("gpukv.address", "gpukv.autostart", "gpukv.autostart_args", "gpukv.chunk_size",
         "gpukv.group", "gpukv.timeout_s", "gpukv.step_budget_s", "gpukv.lookup_wait_s",
         "gpukv.relookup_s", "gpukv.events_address", "gpukv.load_mode", "gpukv.store_mode",
         "gpukv.wait_budget_s", "gpukv.worker_cpus")
LOAD_MODES, STORE_MODES = ("sync", "layerwise", "async"), ("sync", "async")
ROLES = {"kv_both": (True, True), "kv_producer": (False, True), "kv_consumer": (True, False)}


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """Validated connector settings (see the module table)."""

    address: str | None = None
    autostart: bool = True
    autostart_args: tuple[str, ...] = ()
    chunk_size: int | None = None
    group: str | None = None
    timeout_s: float = 10.0
    step_budget_s: float = 0.02
    lookup_wait_s: float = 1.0
    relookup_s: float = 5.0
    events_address: str | None = None
    load_mode: str = "sync"
    store_mode: str = "async"
    wait_budget_s: float = 0.02
    worker_cpus: str | frozenset[int] = "auto"
    load: bool = True
    store: bool = True

    def __post_init__(self) -> None:
        for name, address in (("gpukv.address", self.address),
                              ("gpukv.events_address", self.events_address)):
            if address is not None and not (isinstance(address, str)
                                            and address.startswith(("ipc://", "tcp://"))):
                raise ValueError(f"{name} must be an ipc:// or tcp:// address, got {address!r}")
        if not isinstance(self.autostart, bool):
            raise TypeError(f"gpukv.autostart must be a bool, got {self.autostart!r}")
        if not isinstance(self.autostart_args, tuple) or not all(isinstance(a, str) for a in self.autostart_args):
            raise TypeError(f"gpukv.autostart_args must be a list of str, got {self.autostart_args!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int)
                                            or isinstance(self.chunk_size, bool) or self.chunk_size <= 0):
            raise ValueError(f"gpukv.chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ValueError(f"gpukv.group must be a non-empty str, got {self.group!r}")
        for name, value in (("gpukv.timeout_s", self.timeout_s), ("gpukv.relookup_s", self.relookup_s),
                            ("gpukv.lookup_wait_s", self.lookup_wait_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        budget = self.step_budget_s
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
            raise ValueError(f"gpukv.step_budget_s must be a number in [0, 1] (seconds), got {budget!r}")
        if self.load_mode not in LOAD_MODES:
            raise ValueError(f"gpukv.load_mode must be one of {list(LOAD_MODES)}, got {self.load_mode!r}")
        if self.store_mode not in STORE_MODES:
            raise ValueError(f"gpukv.store_mode must be one of {list(STORE_MODES)}, got {self.store_mode!r}")
        wait = self.wait_budget_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 1:
            raise ValueError(f"gpukv.wait_budget_s must be a number in [0, 1] (seconds), got {wait!r}")
        if not (self.worker_cpus in SETTINGS or isinstance(self.worker_cpus, frozenset) and self.worker_cpus
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.worker_cpus)):
            raise ValueError(f"gpukv.worker_cpus must be one of {list(SETTINGS)} or a list of CPU ids, "
                             f"got {self.worker_cpus!r}")
        if self.group is not None and not 16 <= len(self.group) <= 128:
            raise ValueError(f"gpukv.group must be 16 to 128 characters, got {len(self.group)}")

    def for_groups(self, groups: Sequence[Any], zeroing: bool) -> "ConnectorConfig":
        """The load and store modes a model with these KV cache groups (:mod:`.kv_groups`) can
        run, logged when they differ from the configured ones: several groups load
        asynchronously (vLLM hears of a failed load of such a model only as a failed asynchronous
        load); a sliding-window group stores synchronously when vLLM zeroes the blocks it hands
        out again (``zeroing``: it would zero a freed out-of-window block before the next step's
        fence on the stores still reading it)."""
        load_mode, store_mode = self.load_mode, self.store_mode
        if len(groups) > 1:
            load_mode = "async"
        if zeroing and any(g.sliding for g in groups):
            store_mode = "sync"
        if (load_mode, store_mode) == (self.load_mode, self.store_mode):
            return self
        log.warning("gpukv: the model has %d KV cache groups: load mode %r, store mode %r (configured "
                    "%r, %r)", len(groups), load_mode, store_mode, self.load_mode, self.store_mode)
        return dataclasses.replace(self, load_mode=load_mode, store_mode=store_mode)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, *, kv_role: str | None) -> "ConnectorConfig":
        """Parse vLLM's ``kv_connector_extra_config``; unknown ``gpukv.*`` keys are refused (a
        typo must not silently fall back to a default). Keys of other connectors are ignored."""
        extra = dict(extra or {})
        unknown = sorted(k for k in extra if k.startswith("gpukv.") and k not in _KEYS)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {unknown}; known: {list(_KEYS)}")
        if kv_role not in ROLES:
            raise ValueError(f"kv_role must be one of {sorted(ROLES)}, got {kv_role!r}")
        load, store = ROLES[kv_role]
        address = extra.get("gpukv.address")
        args = extra.get("gpukv.autostart_args", ())
        return cls(address=address, autostart=extra.get("gpukv.autostart", address is None),
                   autostart_args=tuple(args) if isinstance(args, list) else args,
                   chunk_size=extra.get("gpukv.chunk_size"), group=extra.get("gpukv.group"),
                   timeout_s=extra.get("gpukv.timeout_s", 10.0),
                   step_budget_s=extra.get("gpukv.step_budget_s", 0.02),
                   lookup_wait_s=extra.get("gpukv.lookup_wait_s", 1.0),
                   relookup_s=extra.get("gpukv.relookup_s", 5.0),
                   events_address=extra.get("gpukv.events_address"),
                   load_mode=extra.get("gpukv.load_mode", "sync"),
                   store_mode=extra.get("gpukv.store_mode", "async"),
                   wait_budget_s=extra.get("gpukv.wait_budget_s", 0.02),
                   worker_cpus=_cpus_setting(extra.get("gpukv.worker_cpus", "auto")), load=load, store=store)


def _cpus_setting(value: Any) -> Any:
    """``gpukv.worker_cpus`` as given: a setting name, a CPU list (``"1,3-4"`` or ``[1, 3]``:
    a frozenset), or the value unchanged for the check to name."""
    if isinstance(value, str) and value not in SETTINGS:
        try:
            return parse_cpu_list(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return frozenset(value) if all(isinstance(c, int) and not isinstance(c, bool) for c in value) else value
    return value


def check_chunking(chunk_size: int, block_size: int, expected_chunk_size: int | None) -> None:
    """The server's ``chunk_size`` must be a whole number of vLLM blocks (loads and stores then
    cover whole blocks, which the CPU attention layout needs: inside a block its K rows are
    column-major, so a partial block is not a set of token rows), and match the configured one."""
    if expected_chunk_size is not None and expected_chunk_size != chunk_size:
        raise ValueError(f"gpukv.chunk_size={expected_chunk_size} but the server's chunk size is {chunk_size}")
    if chunk_size % block_size:
        raise ValueError(f"the server's chunk size {chunk_size} is not a multiple of vLLM's block size "
                         f"{block_size}; start gpukv serve with --chunk-size {max(block_size, chunk_size // block_size * block_size)}"
                         " or another multiple")
