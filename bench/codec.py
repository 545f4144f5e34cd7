"""Encode + parse throughput of our STUN/TURN codec against aioice's, in the same run.

    python -m bench.codec [--quick]

Each message of a mixed TURN corpus is encoded and the bytes parsed again, by each codec
through its public API as its own code would send: aioice adds FINGERPRINT with
``add_fingerprint()`` and MESSAGE-INTEGRITY with its ``message_integrity()`` (what
``add_message_integrity()`` does, minus the FINGERPRINT it also adds), then ``bytes()``.
aioice's parser verifies FINGERPRINT while parsing, so ours calls ``check_fingerprint()``
too. Before timing, both encoders must produce identical bytes for every message.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioice import stun as aioice

from turnstorm.proto.credentials import long_term_key
from turnstorm.proto.stun import Class, Message, Method, parse

GOAL = 3.0
KEY = long_term_key("1700000000:alice", "turnstorm.test", "Cd/49soE35ICqcJF/bCTn8Z4OyE=")
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
AUTH = {
    "USERNAME": "1700000000:alice",
    "REALM": "turnstorm.test",
    "NONCE": b"0e2b5a8f6c1d7e3a9b4c0d1e2f3a4b5c",
}
CLIENT = ("198.51.100.23", 49152)
RELAYED = ("203.0.113.5", 50000)
PEER = ("192.0.2.77", 40000)
PEER6 = ("2001:db8::77", 40000)
PAYLOAD = bytes(range(160))


@dataclass
class Case:
    """One corpus message: ours, aioice's twin, and how it is secured."""

    name: str
    ours: Message
    theirs: Any
    integrity: bool = False
    fingerprint: bool = False


def _case(
    name: str,
    method: Method,
    message_class: Class,
    attributes: dict[str, Any],
    *,
    integrity: bool = False,
    fingerprint: bool = False,
) -> Case:
    theirs_attributes = dict(attributes)
    if "REQUESTED-TRANSPORT" in theirs_attributes:  # aioice packs it as a 32-bit integer
        theirs_attributes["REQUESTED-TRANSPORT"] <<= 24
    theirs = aioice.Message(
        aioice.Method(method), aioice.Class(message_class), TID, theirs_attributes
    )
    ours = Message(method, message_class, TID, attributes)
    return Case(name, ours, theirs, integrity, fingerprint)


def corpus() -> list[Case]:
    return [
        _case("Binding request", Method.BINDING, Class.REQUEST,
              {"SOFTWARE": "turnstorm 0.1"}, fingerprint=True),
        _case("Binding response", Method.BINDING, Class.RESPONSE,
              {"XOR-MAPPED-ADDRESS": CLIENT, "SOFTWARE": "turnstorm 0.1"}, fingerprint=True),
        _case("Allocate request", Method.ALLOCATE, Class.REQUEST,
              {**AUTH, "REQUESTED-TRANSPORT": 17, "LIFETIME": 600}, integrity=True),
        _case("Allocate response", Method.ALLOCATE, Class.RESPONSE,
              {"XOR-RELAYED-ADDRESS": RELAYED, "XOR-MAPPED-ADDRESS": CLIENT, "LIFETIME": 600},
              integrity=True),
        _case("CreatePermission request", Method.CREATE_PERMISSION, Class.REQUEST,
              {"XOR-PEER-ADDRESS": PEER, **AUTH}, integrity=True),
        _case("ChannelBind request", Method.CHANNEL_BIND, Class.REQUEST,
              {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER6, **AUTH}, integrity=True),
        _case("Send indication", Method.SEND, Class.INDICATION,
              {"XOR-PEER-ADDRESS": PEER, "DATA": PAYLOAD}),
        _case("Data indication", Method.DATA, Class.INDICATION,
              {"XOR-PEER-ADDRESS": PEER, "DATA": PAYLOAD}),
    ]


# -- one codec's work per message -----------------------------------------------------------

def ours_encode(case: Case) -> bytes:
    return case.ours.encode(KEY if case.integrity else None, fingerprint=case.fingerprint)


def ours_parse(case: Case, data: bytes) -> Any:
    msg = parse(data)
    if case.fingerprint:
        msg.check_fingerprint()
    return msg


def theirs_encode(case: Case) -> bytes:
    msg = case.theirs
    if case.integrity:
        msg.attributes.pop("MESSAGE-INTEGRITY", None)
        msg.attributes["MESSAGE-INTEGRITY"] = aioice.message_integrity(bytes(msg), KEY)
    if case.fingerprint:
        msg.add_fingerprint()
    return bytes(msg)


def theirs_parse(case: Case, data: bytes) -> Any:
    return aioice.parse_message(data)


Codec = tuple[Callable[[Case], bytes], Callable[[Case, bytes], Any]]
CODECS: dict[str, Codec] = {
    "ours": (ours_encode, ours_parse),
    "aioice": (theirs_encode, theirs_parse),
}


def check_agreement(cases: list[Case]) -> None:
    """Both encoders give the same bytes, and each parser reads the other's."""
    for case in cases:
        data = ours_encode(case)
        if data != theirs_encode(case):
            raise SystemExit(f"codec: encoders disagree on {case.name}")
        theirs = aioice.parse_message(data)
        if case.integrity:
            parse(data).check_integrity(KEY)
            if not theirs.check_message_integrity(KEY):
                raise SystemExit(f"codec: aioice rejects our integrity on {case.name}")


# -- timing ---------------------------------------------------------------------------------

def _round_trips(codec: Codec, cases: list[Case], loops: int, what: str) -> float:
    encode, decode = codec
    encoded = [(case, encode(case)) for case in cases]
    clock = time.perf_counter
    if what == "encode":
        start = clock()
        for _ in range(loops):
            for case in cases:
                encode(case)
    elif what == "parse":
        start = clock()
        for _ in range(loops):
            for case, data in encoded:
                decode(case, data)
    else:
        start = clock()
        for _ in range(loops):
            for case in cases:
                decode(case, encode(case))
    return clock() - start


def _calibrate(codec: Codec, cases: list[Case], what: str, window: float) -> int:
    """Loops over ``cases`` that take about ``window`` seconds."""
    loops = 1
    while (elapsed := _round_trips(codec, cases, loops, what)) < window / 4:
        loops *= 2
    return max(1, round(loops * window / elapsed))


def rates(cases: list[Case], what: str, window: float, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` messages/s for ours and aioice, timed in alternation.

    Short windows, interleaved, best of many: a window that another process interrupted
    is discarded, and both codecs see the same machine.
    """
    codecs = (CODECS["ours"], CODECS["aioice"])
    loops = [_calibrate(codec, cases, what, window) for codec in codecs]
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, codec in enumerate(codecs):
            best[i] = min(best[i], _round_trips(codec, cases, loops[i], what))
    return loops[0] * len(cases) / best[0], loops[1] * len(cases) / best[1]


def _row(label: str, ours: float, theirs: float) -> str:
    return f"{label:<28} {ours:>12,.0f} {theirs:>12,.0f} {ours / theirs:>7.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (< 20 s)")
    args = parser.parse_args(argv)
    window, repeats = (0.01, 25) if args.quick else (0.02, 60)

    cases = corpus()
    check_agreement(cases)
    print(f"python {sys.version.split()[0]}, aioice {aioice_version()}, "
          f"best of {repeats} x {window * 1000:g} ms, encode+parse messages/s")
    print(f"{'message':<28} {'ours':>12} {'aioice':>12} {'ratio':>8}")
    for case in cases:
        print(_row(case.name, *rates([case], "both", window, repeats)))
    for what in ("encode", "parse"):
        print(_row(f"mixed, {what} only", *rates(cases, what, window, repeats)))
    ours, theirs = rates(cases, "both", window * 2, repeats * 2)
    print(_row("mixed, encode+parse", ours, theirs))
    ratio = ours / theirs
    print(f"codec: {ratio:.2f}x aioice (goal >= {GOAL:g}x) {'ok' if ratio >= GOAL else 'short'}")
    return 0


def aioice_version() -> str:
    from importlib.metadata import version

    return version("aioice")


if __name__ == "__main__":
    sys.exit(main())
