"""A real kernel CGNAT (namespaces, nft SNAT, short conntrack timeouts) in front of coturn:
mapping expiry forces 437s and re-allocations, too few NAT ports fail allocations."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import require
from turnstorm.loadgen.kernelnat import KernelCgnat, missing_tools

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    require(os.geteuid() == 0, "the kernel CGNAT test creates network namespaces: run as root")
    missing = missing_tools()
    require(not missing, f"the kernel CGNAT test needs {', '.join(missing)} "
                         "(apt-get install iproute2 nftables coturn)")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_idle_sessions_past_the_conntrack_timeout_get_new_mappings() -> None:
    before = namespaces()
    with KernelCgnat(subscribers=4, ports=16, timeout=2) as cgnat:
        created = {cgnat.sub, cgnat.nat, cgnat.relay}
        assert created <= namespaces()
        result = cgnat.drive("expiry", idle=3.5)
    assert namespaces() == before  # everything deleted
    subscribers = result["subscribers"]
    assert len(subscribers) == 4
    low, high = cgnat.port_range
    for sub in subscribers:
        assert sub["allocate"] == "ok", sub
        assert sub["echo"] is True
        host, port = sub["mapped"]
        assert host == "198.18.0.1" and low <= port <= high  # the relay sees the NAT
        assert sub["source"][0].startswith("100.64.0.")
    remapped = [s for s in subscribers if s["refresh"] != "ok"]
    # The NAT picks a random free port for a new mapping: the old one comes back only by
    # chance (1 in 16 per subscriber), and then the Refresh simply succeeds. A new port
    # gives 437, or 441 when another subscriber's old allocation still sits on it.
    assert len(remapped) >= 2, subscribers
    for sub in remapped:
        assert sub["refresh"] in ("437", "441"), sub
        assert sub["reallocated"][0] == "198.18.0.1"
        assert low <= sub["reallocated"][1] <= high
        assert sub["reallocated"][1] != sub["mapped"][1]
        assert sub["echo_after"] is True
    for sub in subscribers:
        if sub["refresh"] == "ok":
            assert "reallocated" not in sub


def test_more_subscribers_than_nat_ports_fail_to_allocate() -> None:
    before = namespaces()
    with KernelCgnat(subscribers=6, ports=4, timeout=30) as cgnat:
        result = cgnat.drive("exhaust")
    assert namespaces() == before
    outcomes = sorted(s["allocate"] for s in result["subscribers"])
    assert outcomes == ["TransactionTimeout"] * 2 + ["ok"] * 4, result
    ports = {s["mapped"][1] for s in result["subscribers"] if s["allocate"] == "ok"}
    assert ports == set(range(cgnat.port_range[0], cgnat.port_range[1] + 1))


def test_namespaces_are_deleted_when_setup_fails() -> None:
    before = namespaces()
    cgnat = KernelCgnat(subscribers=1, ports=1, timeout=2)
    cgnat.start_relay = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"), cgnat:
        pass
    assert namespaces() == before
