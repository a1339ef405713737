"""Per-session bounds from ``gpukv serve``'s command line (``--max-instances``,
``--max-open-requests``, ``--max-plans``, ``--max-reserved``): a real server process refuses the
request past a bound with ``Busy`` naming the bound and its flag, and changes nothing; a bad
value stops the command with an error naming the flag; ``Limits`` itself refuses bad values."""

from __future__ import annotations

import pytest
import torch

from frontend_cases import CHUNK, client
from gpukv.cli import build_parser
from gpukv.errors import Busy
from gpukv.frontend.process import ServerProcess
from gpukv.frontend.session import Limits


def pages():
    return [torch.zeros(8, CHUNK, 8, dtype=torch.bfloat16)]


def test_the_flags_bound_a_real_server_and_busy_names_them(tmp_path):
    args = ["--max-instances", "1", "--max-open-requests", "2"]
    with ServerProcess(f"ipc://{tmp_path}/gpukv.sock", capacity_bytes=4 << 20, chunk_size=CHUNK,
                       extra_args=args) as server, client(server.address) as c:
        c.register("a", "m", pages(), "NB,BS,D", kind="mla")
        with pytest.raises(Busy, match=r"at most 1 .*--max-instances"):
            c.register("b", "m", pages(), "NB,BS,D", kind="mla")
        tokens = torch.arange(2 * CHUNK)
        assert c.lookup("m", tokens, request_id="r1") == 0
        assert c.lookup("m", tokens, request_id="r2") == 0
        with pytest.raises(Busy, match=r"at most 2 .*--max-open-requests"):
            c.lookup("m", tokens, request_id="r3")
        assert c.lookup("m", tokens, request_id="r1") == 0  # an open one may repeat
        stats = c.stats()
        assert (stats["instances"], stats["open_requests"]) == (1, 2)  # the refused changed nothing
        c.end_session("r1")
        assert c.lookup("m", tokens, request_id="r3") == 0  # room again


def test_the_flags_reach_the_limits():
    args = build_parser().parse_args(["serve", "--max-instances", "3", "--max-open-requests", "4",
                                      "--max-plans", "5", "--max-reserved", "1MiB"])
    assert (args.max_instances, args.max_open_requests, args.max_plans, args.max_reserved) == \
        (3, 4, 5, 1 << 20)
    more = build_parser().parse_args(["serve", "--max-sessions", "6",
                                      "--max-sessions-per-process", "7", "--orphan-hold", "8"])
    assert (more.max_sessions, more.max_sessions_per_process, more.orphan_hold) == (6, 7, 8.0)
    defaults = build_parser().parse_args(["serve"])
    limits = Limits()
    assert (defaults.max_instances, defaults.max_open_requests, defaults.max_plans,
            defaults.max_reserved) == (limits.max_instances, limits.max_open_requests,
                                       limits.max_plans, None)


@pytest.mark.parametrize("flag", ["--max-instances", "--max-open-requests", "--max-plans",
                                  "--max-sessions", "--max-sessions-per-process"])
def test_a_bad_value_stops_the_command_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", flag, "0"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("max_instances", 0), ("max_open_requests", -1),
                                          ("max_plans", True), ("max_reserved_bytes", 0),
                                          ("max_plans", 1.5)])
def test_limits_refuse_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive int, got {value!r}"):
        Limits(**{field: value})
