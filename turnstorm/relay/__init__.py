"""Code that runs beside relay processes: the coturn processes themselves, their CPU
cgroups, the process actuator of the local mode, the coturn CLI client, the ``/proc``
readers and the relay exporter (collector, HTTP endpoint and the ``turnstorm exporter``
sidecar command).

The pure side of the relays' signals (names, parsing, rates) is :mod:`turnstorm.signals`,
which the operator imports without pulling in this package's sockets and threads.
"""
