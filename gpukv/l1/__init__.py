"""L1: device arenas carved into slabs of fixed-size slots, and the manager that keeps the books
(object states, owned reader shares with leases, copy pins, eviction)."""

from gpukv.constants import MAX_READERS
from gpukv.l1.manager import L1Manager, Status

__all__ = ["L1Manager", "MAX_READERS", "Status"]
