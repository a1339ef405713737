"""``Placement``: which arena a worker's stores go to, and where each new object lands.

- Arenas are named across processes (:mod:`gpukv.l1.topology`): ``cuda-uuid:<uuid>`` for a GPU,
  else the configured name. A worker names its pages' device that way (or an arena's configured
  name); ``arena_for`` finds its arena, or raises naming the device when there is none.
- An object goes to its instance's arena, except for a *shared* model (an MLA cache one object
  of which serves a whole TP group): its new objects are spread over the arenas of all the
  model's instances by chunk hash, so the group's capacity is the sum of its arenas.
"""

from __future__ import annotations

from gpukv.engine.registry import Instance, Registry
from gpukv.l1.topology import GpuView, TorchGpus, arena_index, arena_name


class Placement:
    """Arena choices of one cache whose arenas are on ``devices`` (configured names)."""

    def __init__(self, devices: tuple[str, ...], registry: Registry,
                 view: GpuView | None = None) -> None:
        self.devices, self._registry, self._view = devices, registry, view
        self._names: list[str] | None = None

    @property
    def names(self) -> list[str]:
        """Each arena's name across processes (computed on first use: it may ask CUDA)."""
        if self._names is None:
            view = self._view or TorchGpus()
            self._names = [arena_name(d, view) for d in self.devices]
        return self._names

    def arena_for(self, device: str | None) -> int:
        """The arena a worker's stores go to: ``device`` is an arena's configured name (e.g.
        ``cpu:1``), or a worker's pages' device across processes (``cpu``, ``cuda-uuid:...``;
        None: the first CPU arena). ValueError naming it when this cache has none there."""
        if device in self.devices:
            return self.devices.index(device)
        return arena_index(self.names, device)

    def by_arena(self, inst: Instance, hashes: list[bytes]) -> dict[int, list[int]]:
        """Positions of ``hashes`` per arena their new objects go to (see the module docstring)."""
        shared = self._registry.model(inst.model).shared
        devices = self._registry.devices_of(inst.model) if shared else [inst.device]
        if len(devices) == 1:
            return {devices[0]: list(range(len(hashes)))}
        out: dict[int, list[int]] = {}
        for i, h in enumerate(hashes):
            out.setdefault(devices[int.from_bytes(h[:8], "little") % len(devices)], []).append(i)
        return out
