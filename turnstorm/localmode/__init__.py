"""Embedded local mode: ``turnstorm run [SCENARIO.yaml]``.

One command reproduces the CGNAT storm against a real, CPU-capped coturn pool on
127.0.0.x and shows the autoscaler holding the ideal column: the same storm (same seed,
same shape) runs twice, against a fixed pool at the minimum size and against the
autoscaled pool, and a report compares them.

Modules: :mod:`~turnstorm.localmode.scenario` (scenario files: a TurnPool and a LoadRun
validated like the apiserver does, local timing), :mod:`~turnstorm.localmode.control`
(the autoscaler loop over the process actuator), :mod:`~turnstorm.localmode.series`
(per-second figures), :mod:`~turnstorm.localmode.progress` (live terminal view),
:mod:`~turnstorm.localmode.report` (report.json, CSV, plots, table) and
:mod:`~turnstorm.localmode.run` (orchestration and lifecycle). Local mode imports no
Locust: each phase's storm runs in a child process (:mod:`turnstorm.loadgen.phase`, its
users in :mod:`turnstorm.loadgen.rotating`, each call to a relay of the rotation
:mod:`turnstorm.loadgen.rotation` shares) that speaks the typed records of
:mod:`turnstorm.loadgen.phaseio`.
"""
