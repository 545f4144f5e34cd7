"""Embedded local mode: ``turnstorm run [SCENARIO.yaml]``.

One command reproduces the CGNAT storm against a real, CPU-capped coturn pool on
127.0.0.x and shows the autoscaler holding the ideal column: the same storm (same seed,
same shape) runs twice, against a fixed pool at the minimum size and against the
autoscaled pool, and a report compares them.

Modules: :mod:`~turnstorm.localmode.scenario` (scenario files: a TurnPool and a LoadRun
validated like the apiserver does, local timing), :mod:`~turnstorm.localmode.control`
(the autoscaler loop over the process actuator), :mod:`~turnstorm.localmode.rotation`
and :mod:`~turnstorm.localmode.users` (each call goes to a relay in rotation),
:mod:`~turnstorm.localmode.series` (per-second figures), :mod:`~turnstorm.localmode.progress`
(live terminal view), :mod:`~turnstorm.localmode.report` (report.json, CSV, plots, table)
and :mod:`~turnstorm.localmode.run` (orchestration and lifecycle).
"""
