"""The operator's own Prometheus metrics (served on ``--metrics-port``).

=============================================  =========  ===================================
metric                                         type       meaning
=============================================  =========  ===================================
turnstorm_operator_reconcile_seconds           histogram  time per handler run, label
                                                          ``handler`` (reconcile|track)
turnstorm_operator_reconcile_errors_total      counter    handler runs that raised, label
                                                          ``handler``
turnstorm_operator_retries_total               counter    handler runs that asked for a
                                                          retry (e.g. Secret missing)
turnstorm_operator_pools                       gauge      TurnPools handled by this operator
turnstorm_operator_desired_relays              gauge      desired relays, labels ``namespace``,
                                                          ``pool``
turnstorm_operator_deployment_relays           gauge      Deployment replicas (desired plus
                                                          draining)
turnstorm_operator_draining_relays             gauge      relays out of rotation, draining
turnstorm_operator_standby_relays              gauge      placement pack: ready relays kept out
                                                          of the client Service until needed
turnstorm_operator_saturation_ratio            gauge      signal value / target, labels
                                                          ``namespace``, ``pool``, ``signal``
turnstorm_operator_scale_events_total          counter    scaling actions, labels ``namespace``,
                                                          ``pool``, ``action`` (ScaleUp|
                                                          ScaleDown|Drain|Undrain|Remove|Delete)
turnstorm_operator_probe_rtt_seconds           gauge      the operator's own STUN Binding RTT
                                                          to each relay, labels ``namespace``,
                                                          ``pool``, ``relay`` (NaN: no answer)
turnstorm_operator_queue_depth                 gauge      pools with a change or retry not yet
                                                          handled successfully
=============================================  =========  ===================================
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "turnstorm_operator_reconcile_seconds", "Time per handler run", ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = Counter(
    "turnstorm_operator_reconcile_errors", "Handler runs that raised", ["handler"])
RETRIES = Counter("turnstorm_operator_retries", "Handler runs that asked for a retry")
POOLS = Gauge("turnstorm_operator_pools", "TurnPools handled by this operator")
DESIRED = Gauge("turnstorm_operator_desired_relays", "Desired relays in rotation",
                ["namespace", "pool"])
DEPLOYMENT = Gauge("turnstorm_operator_deployment_relays",
                   "Deployment replicas (desired plus draining)", ["namespace", "pool"])
DRAINING = Gauge("turnstorm_operator_draining_relays", "Relays draining",
                 ["namespace", "pool"])
STANDBY = Gauge("turnstorm_operator_standby_relays", "Relays on standby (placement pack)",
                ["namespace", "pool"])
SATURATION = Gauge("turnstorm_operator_saturation_ratio", "Signal value over its target",
                   ["namespace", "pool", "signal"])
SCALE_EVENTS = Counter("turnstorm_operator_scale_events", "Scaling actions",
                       ["namespace", "pool", "action"])
PROBE_RTT = Gauge("turnstorm_operator_probe_rtt_seconds",
                  "The operator's STUN Binding RTT to each relay", ["namespace", "pool", "relay"])
QUEUE_DEPTH = Gauge("turnstorm_operator_queue_depth",
                    "Pools with a change or retry not yet handled successfully")
