"""LeaseIndex scenarios: deadline order under refresh, exact expiry, releasing an owner."""

from __future__ import annotations

import pytest

from gpukv.l1.leases import LeaseIndex


def test_refresh_moves_a_key_behind_the_owners_later_deadlines():
    leases = LeaseIndex()
    for key, deadline in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        leases.refresh("r", key, deadline)
    leases.refresh("r", "a", 4.0)  # a refreshed: b c a
    assert list(leases["r"].items()) == [("b", 2.0), ("c", 3.0), ("a", 4.0)]
    assert leases.num_leases() == 3 and len(leases) == 1


def test_pop_expired_returns_exactly_the_expired_leases_and_forgets_idle_owners():
    leases = LeaseIndex()
    leases.refresh("r", "a", 1.0)
    leases.refresh("r", "b", 2.0)
    leases.refresh("s", "a", 2.0)
    leases.refresh("t", "c", 5.0)
    leases.refresh("r", "a", 3.0)  # r: b(2) a(3); without the move, a would stop the walk at b
    assert leases.pop_expired(1.9) == []
    assert leases.pop_expired(2.0) == [("r", "b"), ("s", "a")]  # deadline == now has expired
    assert dict(leases) == {"r": {"a": 3.0}, "t": {"c": 5.0}}  # s held nothing more: gone
    assert leases.pop_expired(10.0) == [("r", "a"), ("t", "c")]
    assert leases == {} and leases.num_leases() == 0


def test_pop_owner_drop_and_forget_if_idle():
    leases = LeaseIndex()
    leases.refresh("r", "a", 1.0)
    leases.refresh("r", "b", 2.0)
    leases.refresh("s", "a", 1.0)
    assert leases.pop_owner("r") == ["a", "b"] and list(leases) == ["s"]
    assert leases.pop_owner("r") == []  # unknown owner: nothing, no error
    leases.drop("s", "a")
    assert leases == {}
    with pytest.raises(KeyError):
        leases.drop("s", "a")
    assert leases.owned("u") == {} and "u" in leases  # created empty for a hot loop ...
    leases.forget_if_idle("u")
    leases.forget_if_idle("never-seen")
    assert leases == {}  # ... and forgotten once idle
