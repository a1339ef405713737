"""Which client processes a session's frames came from, as the server itself can tell, and
whether they still run.

A worker that was handed arena slots may write into them until its process is gone, so the
server keeps a reaped session's slots until then. It never takes the client's word for which
process that is (a pid a client reports may be wrong, dead, or from another pid namespace): on
ipc:// the kernel tells it, per connection, through ``SO_PEERCRED`` (libzmq puts it in each
message's ``Peer-Address`` property as ``<host>:<uid>:<gid>:<pid>``), in the server's own pid
namespace (0 when the peer's process is not visible there). A process is remembered with its
start time, so a pid reused by a new process is not mistaken for the old one. A session with a
frame the server could not attribute (tcp://, a pid 0, more processes than it keeps) is
*unverified*: its orphans are held for a fixed time instead (see
:mod:`gpukv.frontend.orphans`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

MAX_PROCESSES = 8  # processes remembered per session (a session shared by more is unverified)


class Process(NamedTuple):
    """A process by pid and start time (clock ticks after boot, ``/proc/<pid>/stat`` field 22)."""

    pid: int
    start: int


def peer_pid(peer_address: str | None) -> int | None:
    """The pid in a zmq ``Peer-Address`` property of an ipc:// connection (``host:uid:gid:pid``),
    or None (tcp://: an address without credentials)."""
    if not peer_address:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return int(parts[3])


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time) of process ``pid``, or None when there is none visible."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[19])


def process(pid: int) -> Process | None:
    """``pid`` as a :class:`Process` if it runs now (not a zombie), else None."""
    stat = _stat(pid) if pid > 0 else None
    if stat is None or stat[0] in (b"Z", b"X"):
        return None
    return Process(pid, stat[1])


def running(proc: Process) -> bool:
    """Whether ``proc`` still runs: its pid exists, is not a zombie, and started when it did."""
    stat = _stat(proc.pid)
    return stat is not None and stat[0] not in (b"Z", b"X") and stat[1] == proc.start


@dataclass(slots=True)
class Peers:
    """The processes a session's frames came from."""

    processes: dict[int, Process] = field(default_factory=dict)
    unverified: bool = False

    def observe(self, pid: int | None) -> None:
        """Note a frame from ``pid`` (from :func:`peer_pid`; None or 0: not attributable)."""
        if pid in self.processes or self.unverified:
            return
        proc = process(pid) if pid else None
        if proc is None or len(self.processes) >= MAX_PROCESSES:
            self.unverified = True  # a frame from somewhere the server cannot watch
        else:
            self.processes[pid] = proc

    @property
    def main(self) -> Process | None:
        """The one process of a verified session (None when unverified or shared by several)."""
        if self.unverified or len(self.processes) != 1:
            return None
        return next(iter(self.processes.values()))

    def gone(self) -> bool:
        """True when the session is verified and none of its processes runs any more."""
        return not self.unverified and not any(running(p) for p in self.processes.values())
