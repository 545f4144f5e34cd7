# ruff: noqa: E501 - captured /proc and CLI text is kept verbatim
"""Parsers of the relay exporter, on text captured once from a live coturn 4.6.1 (three
allocations of two users, a channel each, some ChannelData) and from its /proc files."""

from __future__ import annotations

import pytest

from turnstorm.relay.coturncli import (
    CoturnCliError,
    parse_sessions,
    parse_total_allocations,
    parse_users,
)
from turnstorm.relay.procfs import parse_proc_udp, parse_snmp_udp, parse_stat_cpu_seconds
from turnstorm.signals import SignalTracker, scrape_signals

PC = """
  verbose: OFF
  daemon process: OFF
  stale-nonce: ON (*)
  stun-only: OFF (*)
  no-stun: OFF (*)
  secure-stun: OFF (*)
  do-not-use-config-file: OFF
  RFC5780 support: OFF
  net engine version: 3
  net engine: UDP thread per CPU core
  enforce fingerprints: ON
  mobility: OFF (*)
  udp-self-balance: OFF
  pidfile: /tmp/turnstorm-relay-xjzlyins/turnserver.pid
  process user ID: 0
  process group ID: 0
  process dir: /work/main

  cipher-list: DEFAULT
  ec-curve-name: empty
  DH-key-length: 2066
  Certificate Authority file: empty
  Certificate file: turn_server_cert.pem
  Private Key file: turn_server_pkey.pem
  Listener addr: 127.0.0.1
  no-udp: OFF
  no-tcp: OFF
  no-dtls: ON
  no-tls: ON
  TLSv1.0: OFF
  TLSv1.1: OFF
  TLSv1.2: OFF
  listener-port: 56453
  tls-listener-port: 5349
  alt-listener-port: 0
  alt-tls-listener-port: 0


  Relay addr: 127.0.0.1
  server-relay: OFF
  no-udp-relay: OFF (*)
  no-tcp-relay: ON (*)
  min-port: 20000
  max-port: 20999
  Whitelist IP (static): 127.0.0.0-127.255.255.255
  Blacklist IP (static): 0.0.0.0-0.255.255.255
  Blacklist IP (static): 10.0.0.0-10.255.255.255
  Blacklist IP (static): 100.64.0.0-100.127.255.255
  Blacklist IP (static): 169.254.0.0-169.254.255.255
  Blacklist IP (static): 172.16.0.0-172.31.255.255
  Blacklist IP (static): 192.168.0.0-192.168.255.255
  Blacklist IP (static): ::1
  Blacklist IP (static): fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff
  Blacklist IP (static): fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff
  no-multicast-peers: ON (*)
  allow-loopback-peers: ON (*)

  DB type: SQLite
  DB: /tmp/turnstorm-relay-xjzlyins/turndb

  Default realm: turnstorm.local
  CLI session realm: turnstorm.local
  Long-term authorization mechanism: ON
  TURN REST API support: ON
  TURN REST API separator ASCII number: 58

  total-current-allocs: 3

  Default total-quota: 2000 (**)
  Default user-quota: 10 (**)
  Total server bps-capacity: 0 (**)
  Allocated bps-capacity: 0
  Default max-bps: 0 (**)

  current realm total-quota: 2000
  current realm user-quota: 10
  current realm max-bps: 0

  cli-max-output-sessions: 256 (**)

  (Note 1: parameters with (*) are toggleable)

  (Note 2: parameters with (**) are changeable)

"""

PU = """
    user: <1795777540:bob>, 1 sessions
    user: <1795777540:alice>, 2 sessions

  Total sessions: 3

"""

PS = """
    1) id=000000000000000004, user <1795777540:bob>:
      realm: turnstorm.local
      started 0 secs ago
      expiring in 600 secs
      client protocol UDP, relay protocol UDP
      client addr 127.0.0.1:39159, server addr 127.0.0.1:56453
      relay addr 127.0.0.1:20524
      fingerprints enforced: ON
      mobile: OFF
      usage: rp=3, rb=288, sp=2, sb=220
       rate: r=0, s=0, total=0 (bytes per sec)
      peers:
          127.0.0.1:34543

    2) id=000000000000000002, user <1795777540:alice>:
      realm: turnstorm.local
      started 0 secs ago
      expiring in 600 secs
      client protocol UDP, relay protocol UDP
      client addr 127.0.0.1:52556, server addr 127.0.0.1:56453
      relay addr 127.0.0.1:20528
      fingerprints enforced: ON
      mobile: OFF
      usage: rp=3, rb=288, sp=2, sb=220
       rate: r=0, s=0, total=0 (bytes per sec)
      peers:
          127.0.0.1:34543

    3) id=000000000000000003, user <1795777540:alice>:
      realm: turnstorm.local
      started 0 secs ago
      expiring in 600 secs
      client protocol UDP, relay protocol UDP
      client addr 127.0.0.1:42348, server addr 127.0.0.1:56453
      relay addr 127.0.0.1:20178
      fingerprints enforced: ON
      mobile: OFF
      usage: rp=3, rb=288, sp=2, sb=220
       rate: r=0, s=0, total=0 (bytes per sec)
      peers:
          127.0.0.1:34543

  Total sessions: 3

"""

PS_CAPPED = """
    1) id=000000000000000004, user <1795777540:bob>:
      realm: turnstorm.local
      started 0 secs ago
      expiring in 600 secs
      client protocol UDP, relay protocol UDP
      client addr 127.0.0.1:39159, server addr 127.0.0.1:56453
      relay addr 127.0.0.1:20524
      fingerprints enforced: ON
      mobile: OFF
      usage: rp=3, rb=288, sp=2, sb=220
       rate: r=0, s=0, total=0 (bytes per sec)
      peers:
          127.0.0.1:34543

    2) id=000000000000000002, user <1795777540:alice>:
      realm: turnstorm.local
      started 0 secs ago
      expiring in 600 secs
      client protocol UDP, relay protocol UDP
      client addr 127.0.0.1:52556, server addr 127.0.0.1:56453
      relay addr 127.0.0.1:20528
      fingerprints enforced: ON
      mobile: OFF
      usage: rp=3, rb=288, sp=2, sb=220
       rate: r=0, s=0, total=0 (bytes per sec)
      peers:
          127.0.0.1:34543

...

  Total sessions: 3

  Warning: too many output sessions, more than the
  current value of cli-max-output-sessions CLI parameter.
  Refine your request or increase cli-max-output-sessions value.

"""  # after `cc cli-max-output-sessions 2`

SNMP = """Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates OutTransmits
Ip: 2 64 25648635 0 0 0 0 0 25648635 25639617 0 0 0 0 0 0 0 0 0 25639617
Icmp: InMsgs InErrors InCsumErrors InDestUnreachs InTimeExcds InParmProbs InSrcQuenchs InRedirects InEchos InEchoReps InTimestamps InTimestampReps InAddrMasks InAddrMaskReps OutMsgs OutErrors OutRateLimitGlobal OutRateLimitHost OutDestUnreachs OutTimeExcds OutParmProbs OutSrcQuenchs OutRedirects OutEchos OutEchoReps OutTimestamps OutTimestampReps OutAddrMasks OutAddrMaskReps
Icmp: 202 0 0 202 0 0 0 0 0 0 0 0 0 0 201 0 0 0 201 0 0 0 0 0 0 0 0 0 0
IcmpMsg: InType3 OutType3
IcmpMsg: 202 201
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 1345 1223 47 701 155 97084 88022 100 0 757 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 44794542 201 380815 25551350 380815 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 0 0 0
"""

PROC_UDP = """   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  131: 0100007F:AFBB 0100007F:C0ED 01 00000000:00000000 00:00000000 00000000     0        0 92800 2 00000000673174da 0
 4533: 0100007F:C0ED 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 91720 2 00000000d971de1c 0
 8090: 0100007F:4ED2 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 91758 2 0000000074d1505c 0
 8436: 0100007F:502C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 92810 2 00000000fd296488 0
 8440: 0100007F:5030 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 91756 2 00000000d4488c0a 0
"""

STAT = """857 (turnserver) S 855 857 857 0 -1 4194560 1307 0 0 0 1 1 0 0 20 0 6 0 205022 409063424 3833 18446744073709551615 94222819033088 94222819339057 140725139298448 0 0 0 0 4096 2049 0 0 0 17 1 0 0 0 0 0 94222819457520 94222819511256 94223230926848 140725139307030 140725139307099 140725139307099 140725139308516 0
"""


def test_total_allocations_from_pc() -> None:
    assert parse_total_allocations(PC) == 3


def test_pc_without_the_line_is_an_error() -> None:
    with pytest.raises(CoturnCliError, match="total-current-allocs"):
        parse_total_allocations("\n  verbose: OFF\n")


def test_sessions_per_user_from_pu() -> None:
    users, total = parse_users(PU)
    assert users == {"1795777540:alice": 2, "1795777540:bob": 1}
    assert total == 3


def test_empty_pu() -> None:
    assert parse_users("\n  Total sessions: 0\n\n") == ({}, 0)


def test_session_usage_from_ps() -> None:
    usage = parse_sessions(PS)
    assert (usage.listed, usage.total, usage.truncated) == (3, 3, False)
    assert usage.per_session == {
        "000000000000000004": (3, 288, 2, 220),
        "000000000000000002": (3, 288, 2, 220),
        "000000000000000003": (3, 288, 2, 220),
    }
    assert (usage.received_packets, usage.received_bytes) == (9, 864)
    assert (usage.sent_packets, usage.sent_bytes) == (6, 660)


def test_capped_ps_is_flagged_truncated() -> None:
    usage = parse_sessions(PS_CAPPED)
    assert (usage.listed, usage.total, usage.truncated) == (2, 3, True)
    assert usage.received_packets == 6


def test_snmp_udp_counters() -> None:
    udp = parse_snmp_udp(SNMP)
    assert udp["InDatagrams"] == 44794542
    assert udp["RcvbufErrors"] == 380815
    assert udp["SndbufErrors"] == 0
    assert "UdpLite" not in udp


def test_snmp_without_udp_lines() -> None:
    with pytest.raises(ValueError, match="Udp"):
        parse_snmp_udp("Ip: Forwarding\nIp: 1\n")


def test_proc_udp_rows() -> None:
    sockets = parse_proc_udp(PROC_UDP)
    assert [s.inode for s in sockets] == [92800, 91720, 91758, 92810, 91756]
    relay = next(s for s in sockets if s.inode == 91758)
    assert relay.local == "0100007F:4ED2"  # 127.0.0.1:20178, a relayed address
    assert (relay.rx_queue, relay.tx_queue, relay.drops) == (0, 0, 0)


def test_proc_udp_hex_queues_and_decimal_drops() -> None:
    row = (" 8090: 0100007F:4ED2 00000000:0000 07 0000001A:00034000 00:00000000 00000000"
           "     0        0 91758 2 0000000074d1505c 1234")
    (sock,) = parse_proc_udp(PROC_UDP.splitlines()[0] + "\n" + row + "\n")
    assert (sock.tx_queue, sock.rx_queue, sock.drops) == (0x1A, 0x34000, 1234)


def test_cpu_seconds_from_stat() -> None:
    assert parse_stat_cpu_seconds(STAT, 100) == pytest.approx(0.02)  # utime 1 + stime 1
    odd = "42 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0"
    assert parse_stat_cpu_seconds(odd, 100) == pytest.approx(3.0)


EXPOSITION = """\
# HELP turnstorm_relay_up 1 when the coturn CLI answered this scrape
# TYPE turnstorm_relay_up gauge
turnstorm_relay_up{relay="r1"} 1.0
# TYPE turnstorm_relay_allocations gauge
turnstorm_relay_allocations{relay="r1"} 20.0
# TYPE turnstorm_relay_relayed_packets counter
turnstorm_relay_relayed_packets_total{direction="received",relay="r1"} 100.0
turnstorm_relay_relayed_packets_total{direction="sent",relay="r1"} 50.0
# TYPE turnstorm_relay_udp_rcvbuf_errors counter
turnstorm_relay_udp_rcvbuf_errors_total{relay="r1"} 1000.0
# TYPE turnstorm_relay_cpu_seconds counter
turnstorm_relay_cpu_seconds_total{relay="r1"} 10.0
"""


def test_scrape_signals_reads_one_relay() -> None:
    values = scrape_signals(EXPOSITION)
    assert values == {"up": 1.0, "allocations": 20.0, "relayed_packets_total": 150.0,
                      "udp_rcvbuf_errors_total": 1000.0, "cpu_seconds_total": 10.0}


def test_scrape_signals_needs_a_name_with_several_relays() -> None:
    two = EXPOSITION + 'turnstorm_relay_up{relay="r2"} 0.0\n'
    with pytest.raises(ValueError, match="several relays"):
        scrape_signals(two)
    assert scrape_signals(two, relay="r2") == {"up": 0.0}


def test_tracker_turns_counters_into_rates() -> None:
    tracker = SignalTracker(cpu_limit_cores=0.5)
    first = tracker.update("r1", 100.0, scrape_signals(EXPOSITION))
    assert first["allocations"] == 20.0
    assert first["udp_rcvbuf_errors"] is None  # one scrape: no rate yet (missing)
    later = dict(scrape_signals(EXPOSITION), udp_rcvbuf_errors_total=1300.0,
                 relayed_packets_total=750.0, cpu_seconds_total=11.0)
    second = tracker.update("r1", 110.0, later)
    assert second["udp_rcvbuf_errors"] == pytest.approx(30.0)
    assert second["relayed_pps"] == pytest.approx(60.0)
    assert second["cpu_percent"] == pytest.approx(20.0)  # 0.1 core of a 0.5 core limit
    assert first["binding_rate"] is None and second["binding_rate"] is None  # no series
    third = tracker.update("r1", 112.0, dict(later, binding_requests_total=100.0))
    fourth = tracker.update("r1", 114.0, dict(later, binding_requests_total=900.0))
    assert third["binding_rate"] is None and fourth["binding_rate"] == pytest.approx(400.0)


def test_tracker_counter_reset_and_down_relay_are_missing() -> None:
    tracker = SignalTracker()
    tracker.update("r1", 0.0, scrape_signals(EXPOSITION))
    reset = dict(scrape_signals(EXPOSITION), udp_rcvbuf_errors_total=5.0, up=0.0)
    signals = tracker.update("r1", 5.0, reset)
    assert signals["udp_rcvbuf_errors"] is None
    assert signals["allocations"] is None
    assert signals["relayed_pps"] is None


def test_tracker_keeps_relays_apart() -> None:
    tracker = SignalTracker()
    tracker.update("a", 0.0, {"up": 1.0, "udp_rcvbuf_errors_total": 0.0})
    tracker.update("b", 0.0, {"up": 1.0, "udp_rcvbuf_errors_total": 500.0})
    assert tracker.update("a", 1.0, {"up": 1.0, "udp_rcvbuf_errors_total": 10.0})[
        "udp_rcvbuf_errors"] == pytest.approx(10.0)
