"""The caps on open connections (server/open_connections.py): in all and per client address,
refused ones not counted. The servers' own use of them is tests/server/test_hostile_http.py's."""

from __future__ import annotations

from server.open_connections import OpenConnections
from server.request_deadlines import RequestLimits


def test_an_address_gets_its_share_and_the_others_theirs() -> None:
    connections = OpenConnections(RequestLimits(max_connections=10, connections_per_client=2))
    assert connections.opened("10.0.0.1") is None
    assert connections.opened("10.0.0.1") is None
    refusal = connections.opened("10.0.0.1")
    assert refusal is not None and "http.connections_per_client" in refusal
    assert "2 open connections from this address" in refusal
    # The refused one is not counted: the address still holds two, another gets its own.
    assert connections.count("10.0.0.1") == 2
    assert connections.opened("10.0.0.2") is None
    assert connections.count() == 3
    connections.closed("10.0.0.1")
    assert connections.opened("10.0.0.1") is None


def test_connections_over_the_total_are_refused_until_one_closes() -> None:
    connections = OpenConnections(RequestLimits(max_connections=3, connections_per_client=2))
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        assert connections.opened(address) is None
    refusal = connections.opened("10.0.0.3")
    assert refusal is not None and "over 3 open connections (http.max_connections)" in refusal
    assert connections.count() == 3 and connections.count("10.0.0.3") == 0
    connections.closed("10.0.0.2")
    assert connections.count("10.0.0.2") == 0
    assert connections.opened("10.0.0.3") is None
