"""The emulated CGNAT population on an explicit clock."""

from __future__ import annotations

import pytest

from turnstorm.loadgen.cgnat import Gateway, Population, PortQuotaExhausted


def test_subscribers_spread_over_gateways_with_distinct_ports() -> None:
    population = Population.build(2, 3, 120, base_address="127.100.0.1", port_min=40000)
    mappings = [population.map(n, 0.0) for n in range(6)]
    assert [(m.address, m.port) for m in mappings] == [
        ("127.100.0.1", 40000), ("127.100.0.2", 40000), ("127.100.0.1", 40001),
        ("127.100.0.2", 40001), ("127.100.0.1", 40002), ("127.100.0.2", 40002),
    ]
    assert population.in_use(0, 0.0) == 3


def test_traffic_keeps_a_mapping_and_idleness_expires_it() -> None:
    population = Population.build(1, 10, timeout=120)
    first = population.map(7, 0.0)
    assert population.map(7, 100.0) is first  # refreshed at 100
    assert population.touch(7, 200.0)  # 100 s idle: still alive, refreshed at 200
    assert population.lookup(7, 319.9) is first
    assert population.lookup(7, 320.0) is None  # 120 s idle: gone
    assert not population.touch(7, 320.0)
    second = population.map(7, 321.0)
    assert second.port != first.port  # a new 5-tuple: the relay sees a new client
    assert population.stats.remaps == 1
    assert population.stats.mappings_expired == 1


def test_exhaustion_refuses_new_subscribers_until_a_mapping_expires() -> None:
    population = Population.build(1, 2, timeout=30, base_address="127.100.0.9")
    population.map(0, 0.0)
    population.map(1, 10.0)
    with pytest.raises(PortQuotaExhausted) as info:
        population.map(2, 20.0)
    assert str(info.value) == ("CGNAT gateway 127.100.0.9: all 2 ports are mapped "
                               "(ports 40000-40001)")
    assert population.stats.exhausted == 1
    mapping = population.map(2, 30.0)  # subscriber 0 idle for 30 s: its port is free
    assert mapping.port == 40000
    assert population.lookup(0, 30.0) is None


def test_hold_down_delays_port_reuse() -> None:
    population = Population([Gateway("127.100.0.1", 40000, 40000, timeout=10, hold=5)])
    population.map(0, 0.0)
    with pytest.raises(PortQuotaExhausted):
        population.map(1, 12.0)  # expired at 10, held until 15
    assert population.map(1, 15.0).port == 40000


def test_expire_sweeps_idle_mappings() -> None:
    population = Population.build(1, 5, timeout=60)
    for n, t in enumerate((0.0, 10.0, 50.0)):
        population.map(n, t)
    assert population.expire(65.0) == [0]
    assert population.expire(75.0) == [1]
    assert sorted(population.mappings) == [2]


def test_invalid_gateways() -> None:
    with pytest.raises(ValueError, match="port range 2-1 is invalid"):
        Gateway("127.100.0.1", 2, 1, 30)
    with pytest.raises(ValueError, match="needs at least one gateway"):
        Population([])
