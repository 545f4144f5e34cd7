"""Operator reconcile latency at scale, on the real test apiserver.

Starts etcd + kube-apiserver (cached binaries, see scripts/build-control-plane.sh), runs
``turnstorm operator`` as a subprocess, and measures, from creation to the first status
the operator writes (every owned object applied):

* baseline: one TurnPool created alone;
* load: N TurnPools (default 200) created at once with one ``kubectl apply``.

Prints p50/p99 for both, the ratio load p99 / baseline p50, and the operator's peak RSS
(VmHWM). Goal: p99 for N pools at once under 60 s.

    python -m bench.operator [--quick] [--pools N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from turnstorm.testing.controlplane import ControlPlane, build_binaries

ROOT = Path(__file__).resolve().parents[1]
GOAL_P99_S = 60.0


def pool(name: str, namespace: str) -> dict[str, object]:
    return {"apiVersion": "turnstorm.io/v1alpha1", "kind": "TurnPool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"realm": "bench.example", "authSecretRef": {"name": "auth"},
                     "replicas": {"min": 1, "max": 4, "target": 1}}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reconciled(plane: ControlPlane, namespace: str) -> dict[str, str]:
    out = plane.kubectl("get", "turnpools", "-n", namespace, "-o", "json").stdout
    done = {}
    for item in json.loads(out)["items"]:
        status = item.get("status") or {}
        if status.get("observedGeneration") == item["metadata"]["generation"]:
            done[item["metadata"]["name"]] = item["metadata"]["creationTimestamp"]
    return done


def measure(plane: ControlPlane, namespace: str, count: int, timeout: float) -> list[float]:
    plane.kubectl("create", "namespace", namespace)
    plane.kubectl("create", "secret", "generic", "auth", "-n", namespace,
                  "--from-literal=secret=bench-only-secret")
    docs = "".join("---\n" + yaml.safe_dump(pool(f"p{i:04d}", namespace)) for i in range(count))
    start = time.monotonic()
    plane.kubectl("apply", "-f", "-", input_text=docs)
    seen: dict[str, float] = {}
    deadline = start + timeout
    while len(seen) < count and time.monotonic() < deadline:
        now = time.monotonic()
        for name in reconciled(plane, namespace):
            seen.setdefault(name, now - start)
        print(f"  {len(seen)}/{count} reconciled after {now - start:5.1f} s", file=sys.stderr,
              end="\r")
        time.sleep(0.2)
    print(file=sys.stderr)
    if len(seen) < count:
        print(f"  only {len(seen)} of {count} pools reconciled within {timeout:g} s",
              file=sys.stderr)
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 pools instead of 200")
    parser.add_argument("--pools", type=int, help="pools created at once (default 200)")
    args = parser.parse_args(argv)
    count = args.pools or (50 if args.quick else 200)
    print("building/reusing the control plane ...", file=sys.stderr)
    bin_dir = build_binaries()
    with ControlPlane(bin_dir) as plane:
        plane.kubectl("apply", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=established", "--timeout=60s",
                      "crd/turnpools.turnstorm.io")
        env = dict(os.environ, TURNSTORM_TIMER_SECONDS="30")
        operator = subprocess.Popen(
            [sys.executable, "-m", "turnstorm", "operator", f"--kubeconfig={plane.kubeconfig}",
             "--metrics-port=0", "--liveness=http://127.0.0.1:0/healthz"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            time.sleep(3)
            print("baseline: 1 pool ...", file=sys.stderr)
            baseline = [measure(plane, "bench-base", 1, 60)[0]]
            for index in range(2):
                baseline += measure(plane, f"bench-base{index}", 1, 60)
            print(f"load: {count} pools at once ...", file=sys.stderr)
            load = measure(plane, "bench-load", count, 300)
            rss = peak_rss_mb(operator.pid)
        finally:
            operator.terminate()
            operator.wait(20)
    base_p50 = statistics.median(baseline)
    p50, p99 = percentile(load, 50), percentile(load, 99)
    print(f"{'':24}{'p50 s':>10}{'p99 s':>10}{'pools':>8}")
    print(f"{'baseline (1 pool)':24}{base_p50:>10.3f}{max(baseline):>10.3f}{len(baseline):>8}")
    print(f"{f'{count} pools at once':24}{p50:>10.3f}{p99:>10.3f}{len(load):>8}")
    print(f"ratio load p99 / baseline p50: {p99 / base_p50:.1f}x")
    print(f"operator peak RSS: {rss:.0f} MiB")
    ok = len(load) == count and p99 <= GOAL_P99_S
    print(f"operator: p99 {p99:.1f} s for {count} pools (goal < {GOAL_P99_S:g} s) "
          f"{'ok' if ok else 'short'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
