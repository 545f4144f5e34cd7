"""Relay scaling on a real node: pod start, scale-out reaction, drain, allocations cut.

Uses the node ``scripts/cluster.sh up`` started (or brings one up and tears it down
afterwards; its start-up time is printed apart and not part of the figures), installs
the chart's operator from the image `make image` builds, and measures on running pods:

* **pod start**: a TurnPool applied -> its first relay pod Ready (the same run's
  baseline for the reaction goal);
* **scale-out reaction**: a bounded storm from the host through the pool's ClusterIP
  starts -> a relay the operator added carries calls (its exporter reports
  allocations);
* **drain**: the storm ends -> the pool back at ``replicas.min`` relays, every drained
  relay removed;
* **allocations cut**, counted from the generator's side (failed refreshes and
  releases, failed allocations).

Goal: reaction <= 2 evaluation intervals + pod start, and 0 cut.

    python -m bench.node [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from turnstorm.relay.procfs import read_steal_seconds
from turnstorm.testing import cluster
from turnstorm.testing.node import Node, image_named, read_images

INTERVAL_S = 2
"""The pool's metrics.intervalSeconds: the operator evaluates it every 2 s."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.node", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a shorter storm (under a minute)")
    args = parser.parse_args(argv)
    node, owned = Node.running(), False
    if node is None:
        start = time.monotonic()
        node, owned = Node(), True
        node.up()
        print(f"node up in {time.monotonic() - start:.1f} s (not part of the figures)")
    try:
        return run(node, args.quick)
    finally:
        if owned:
            node.down()


def run(node: Node, quick: bool) -> int:
    assert node.images is not None
    index = read_images(node.images)
    relay_image = image_named(index, "localhost/turnstorm-relay")
    cluster.install_operator(cluster.helm_binary("3"), node)
    namespace = f"bench-{int(time.time())}"
    node.kubectl("create", "namespace", namespace)
    steal0, work = read_steal_seconds(), Path(tempfile.mkdtemp(prefix="bench-node-"))
    try:
        with cluster.echo_peer() as peer:
            figures = cluster.scale_cycle(node, namespace, relay_image, peer, work,
                                            duration=25 if quick else 60,
                                            interval=INTERVAL_S)
    finally:
        node.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    stolen = read_steal_seconds() - steal0
    goal = 2 * INTERVAL_S + figures["pod start"]
    reaction = figures["scale-out reaction"]
    cut = figures["allocations cut"]
    print(f"pod start (apply -> Ready)         {figures['pod start']:6.2f} s")
    print(f"scale-out reaction (storm -> new   {reaction:6.2f} s   (goal <= 2 x {INTERVAL_S} s"
          f" + pod start = {goal:.2f} s: x{reaction / goal:.2f} of it)")
    print("  relay carrying calls)")
    print(f"drain (storm end -> min relays)    {figures['drain']:6.2f} s")
    print(f"relays at peak                     {figures['peak relays']:6.0f}")
    print(f"allocations cut                    {cut:6.0f}   {figures['cut detail']}")
    print(f"hypervisor steal during the run    {stolen:6.2f} s")
    verdict = "ok" if reaction <= goal and cut == 0 else "short"
    print(f"node: scale-out reaction {reaction:.2f} s, {cut:.0f} cut "
          f"(goal <= {goal:.2f} s, 0 cut) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
