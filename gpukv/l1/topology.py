"""Which GPUs a node's arenas live on, how processes name them, and which arena a worker can read.

Plain code over a :class:`GpuView` (what one process sees: its visible GPUs in CUDA index order,
each with its UUID, and which pairs have peer access), so every deployment shape is testable
with :class:`FakeGpus` on a machine without a GPU; :class:`TorchGpus` is the real view.

- CUDA indices differ between processes (``CUDA_VISIBLE_DEVICES``); a GPU's UUID does not. An
  arena on a GPU is named ``cuda-uuid:<uuid>`` on the wire; a worker finds its arena by the UUID
  of its pages' GPU.
- ``gpukv serve`` without ``--device``/``--devices`` serves every GPU it sees (one arena each);
  started by an engine, it sees what the engine sees (it keeps ``CUDA_VISIBLE_DEVICES``).
- A worker can read an arena on its own GPU, or on a GPU it sees with peer access from its own
  (NVLink, or PCIe P2P): it opens the arena's IPC handle under its *own* device, so CUDA maps the
  peer memory lazily into its own context and no context is created on the other GPU. An arena
  on a GPU it does not see (one container per GPU), or without peer access, it cannot read.
- MLA latents are identical on every TP rank, so one object can serve the whole group -- if
  every rank can read every arena the object may land in. A worker that can read every GPU arena
  of the server registers its MLA cache *shared* (one object per node, spread over the arenas);
  one that cannot registers it *per rank* (each rank keeps its own copy in its own arena, like an
  MHA shard): never an object a rank of the group cannot load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

UUID_PREFIX = "cuda-uuid:"


@dataclass(frozen=True, slots=True)
class Gpu:
    """A GPU as one process sees it: its CUDA index there, its UUID everywhere."""

    index: int
    uuid: str


class GpuView(Protocol):
    """What one process sees of the node's GPUs."""

    def gpus(self) -> list[Gpu]:
        """The visible GPUs, in this process's CUDA index order."""

    def can_access_peer(self, index: int, peer: int) -> bool:
        """Whether a kernel on GPU ``index`` can read GPU ``peer``'s memory (indices here)."""


class TorchGpus:
    """The real view, from torch (the CUDA runtime of this process)."""

    def gpus(self) -> list[Gpu]:
        import torch

        if not torch.cuda.is_available():
            return []
        return [Gpu(i, str(torch.cuda.get_device_properties(i).uuid))
                for i in range(torch.cuda.device_count())]

    def can_access_peer(self, index: int, peer: int) -> bool:
        import torch

        return index == peer or bool(torch.cuda.can_device_access_peer(index, peer))


class FakeGpus:
    """A view for tests: ``uuids`` visible in this order; ``peers``: pairs of UUIDs (either order)
    with peer access, or ``"all"``."""

    def __init__(self, uuids: Sequence[str],
                 peers: Sequence[tuple[str, str]] | str = "all") -> None:
        self._gpus = [Gpu(i, u) for i, u in enumerate(uuids)]
        self._peers = peers if peers == "all" else {frozenset(p) for p in peers}

    def gpus(self) -> list[Gpu]:
        return list(self._gpus)

    def can_access_peer(self, index: int, peer: int) -> bool:
        if index == peer or self._peers == "all":
            return True
        return frozenset((self._gpus[index].uuid, self._gpus[peer].uuid)) in self._peers


def visible(view: GpuView, cuda_visible_devices: str | None, all_uuids: Sequence[str]) -> FakeGpus:
    """What a process started with ``CUDA_VISIBLE_DEVICES=cuda_visible_devices`` sees on a node
    whose GPUs are ``all_uuids`` (indices or UUIDs, comma-separated; None: every GPU), with the
    peer access of ``view`` (a view of the whole node). For simulating deployments."""
    if cuda_visible_devices is None:
        chosen = list(all_uuids)
    else:
        chosen = []
        for item in filter(None, (x.strip() for x in cuda_visible_devices.split(","))):
            chosen.append(all_uuids[int(item)] if item.isdigit() else item.removeprefix("GPU-"))
    index = {g.uuid: g.index for g in view.gpus()}
    peers = [(a, b) for a in chosen for b in chosen if view.can_access_peer(index[a], index[b])]
    return FakeGpus(chosen, peers)


def arena_name(device: str, view: GpuView) -> str:
    """The wire name of an arena on ``device`` (``cpu``, ``cpu:N``, ``cuda``, ``cuda:N`` or
    ``cuda-uuid:<uuid>``): CUDA devices by UUID, CPU devices as given."""
    if device.startswith(UUID_PREFIX):
        uuid = device.removeprefix(UUID_PREFIX)
        if uuid not in {g.uuid for g in view.gpus()}:
            raise ValueError(f"GPU {uuid} is not visible here (visible: {_uuids(view)})")
        return device
    if not device.startswith("cuda"):
        return device
    gpus = view.gpus()
    index = 0 if device == "cuda" else int(device.removeprefix("cuda:"))
    if not 0 <= index < len(gpus):
        raise ValueError(f"device {device!r}: this process sees {len(gpus)} GPU(s)")
    return UUID_PREFIX + gpus[index].uuid


def server_devices(requested: Sequence[str] | None, view: GpuView) -> list[str]:
    """The devices ``gpukv serve`` makes arenas on: ``requested`` (``"all"`` = every visible
    GPU; ``cuda-uuid:<uuid>`` names a GPU by UUID), or by default every visible GPU, else the
    CPU. As torch device names of this process."""
    gpus = view.gpus()
    if requested is None or list(requested) == ["all"]:
        if not gpus:
            if requested is not None:
                raise ValueError("--devices all: this process sees no GPU")
            return ["cpu"]
        return [f"cuda:{g.index}" for g in gpus]
    if "all" in requested:
        raise ValueError(f"'all' cannot be combined with other devices: {list(requested)}")
    index = {g.uuid: g.index for g in gpus}
    out = []
    for name in requested:
        if name.startswith(UUID_PREFIX):
            arena_name(name, view)  # ValueError naming it when it is not visible
            name = f"cuda:{index[name.removeprefix(UUID_PREFIX)]}"
        out.append(name)
    return out


def arena_index(arena_names: Sequence[str], worker_device: str | None) -> int:
    """The arena (index into ``arena_names``, the server's wire names) for a worker whose pages
    are on ``worker_device`` (its wire name; None or "cpu": the first CPU arena)."""
    if worker_device in arena_names:
        return list(arena_names).index(worker_device)
    if worker_device in (None, "cpu"):
        for i, name in enumerate(arena_names):
            if name.startswith("cpu"):
                return i
    raise ValueError(f"this server has no arena for device {worker_device!r} (it has "
                     f"{list(arena_names)}): start it on this GPU too (gpukv serve --devices), "
                     "or let the engine start it (it then sees the engine's GPUs)")


def reachable(own: str, arena_names: Sequence[str], view: GpuView) -> list[bool]:
    """For each arena, whether a worker whose pages are on ``own`` (a wire name) can read it."""
    if not own.startswith(UUID_PREFIX):  # CPU pages: CPU arenas only
        return [not name.startswith(UUID_PREFIX) for name in arena_names]
    index = {g.uuid: g.index for g in view.gpus()}
    me = index.get(own.removeprefix(UUID_PREFIX))
    if me is None:
        raise ValueError(f"{own} is not visible here (visible: {_uuids(view)})")
    out = []
    for name in arena_names:
        peer = index.get(name.removeprefix(UUID_PREFIX)) if name.startswith(UUID_PREFIX) else None
        out.append(peer is not None and view.can_access_peer(me, peer))
    return out


def mla_shared(own: str, arena_names: Sequence[str], view: GpuView) -> bool:
    """Whether a worker on ``own`` can register its MLA cache shared: it reads every arena of the
    server's kind (every GPU arena for GPU pages, every CPU arena for CPU pages)."""
    gpu = own.startswith(UUID_PREFIX)
    same_kind = [name.startswith(UUID_PREFIX) == gpu for name in arena_names]
    return all(r for r, k in zip(reachable(own, arena_names, view), same_kind) if k)


def device_name(device, view: GpuView | None = None) -> str:
    """How a worker names its pages' device (a ``torch.device``) across processes: ``cpu``, or
    ``cuda-uuid:<uuid>``."""
    if device.type != "cuda":
        return "cpu"
    view = view or TorchGpus()
    index = device.index
    if index is None:
        import torch

        index = torch.cuda.current_device()
    return arena_name(f"cuda:{index}", view)


def _uuids(view: GpuView) -> list[str]:
    return [g.uuid for g in view.gpus()]
