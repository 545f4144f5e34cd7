"""Our codec against aioice's on generated messages, and our parser against hostile bytes.

Known differences, none of them on the wire:
- aioice packs REQUESTED-TRANSPORT as a 32-bit integer (UDP is ``17 << 24``); we keep the
  protocol number alone (17), as RFC 8656 section 18.7 lays it out (protocol + 3 RFFU).
- aioice prints IPv6 addresses with ``ipaddress`` and we with ``inet_ntop``: for
  IPv4-mapped addresses aioice gives ``::ffff:102:304`` and we ``::ffff:1.2.3.4`` (the
  RFC 5952 section 5 form). Addresses are compared as ``ipaddress`` objects.
- aioice keeps MESSAGE-INTEGRITY and FINGERPRINT in ``attributes``; we keep their offsets.
- aioice only knows methods 0x001-0x00F (no bit interleaving): methods come from the set
  both codecs name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from typing import Any

from aioice import stun as aioice
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from turnstorm.proto.stun import (
    COOKIE,
    Class,
    IntegrityError,
    Message,
    Method,
    StunParseError,
    encode_channel_data,
    parse,
    parse_channel_data,
    stream_frame_length,
)

SETTINGS = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_SETTINGS = settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

addresses = st.tuples(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(0, 0xFFFF),
)
text = st.text(max_size=40)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

# Attributes both codecs know, with our value representation.
SHARED: dict[str, st.SearchStrategy[Any]] = {
    "MAPPED-ADDRESS": addresses,
    "USERNAME": text,
    "ERROR-CODE": st.tuples(st.integers(300, 699), text),
    "CHANNEL-NUMBER": st.integers(0, 0xFFFF),
    "LIFETIME": u32,
    "XOR-PEER-ADDRESS": addresses,
    "DATA": st.binary(max_size=200),
    "REALM": text,
    "NONCE": st.binary(max_size=64),
    "XOR-RELAYED-ADDRESS": addresses,
    "REQUESTED-TRANSPORT": st.integers(0, 255),
    "XOR-MAPPED-ADDRESS": addresses,
    "PRIORITY": u32,
    "USE-CANDIDATE": st.none(),
    "SOFTWARE": text,
    "ICE-CONTROLLED": u64,
    "ICE-CONTROLLING": u64,
    "RESPONSE-ORIGIN": addresses,
    "OTHER-ADDRESS": addresses,
}
# Attributes only we know: aioice must skip them and still read the rest.
OURS_ONLY: dict[str, st.SearchStrategy[Any]] = {
    "UNKNOWN-ATTRIBUTES": st.lists(st.integers(0, 0xFFFF), max_size=5),
    "REQUESTED-ADDRESS-FAMILY": st.sampled_from([0x01, 0x02]),
    "EVEN-PORT": st.booleans(),
    "DONT-FRAGMENT": st.none(),
    "RESERVATION-TOKEN": st.binary(min_size=8, max_size=8),
    "ALTERNATE-SERVER": addresses,
}
ADDRESS_NAMES = {name for name, strategy in SHARED.items() if strategy is addresses}
MODES = ["plain", "fingerprint", "integrity"]  # aioice's integrity always adds FINGERPRINT
KEYS = st.binary(max_size=32)


def _attributes(table: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        names = draw(st.lists(st.sampled_from(sorted(table)), unique=True, max_size=len(table)))
        return {name: draw(table[name]) for name in names}

    return build()


@st.composite
def messages(draw: st.DrawFn, ours_only: bool = False) -> Message:
    attributes = draw(_attributes(SHARED))
    if ours_only:
        attributes |= draw(_attributes(OURS_ONLY))
    return Message(
        method=draw(st.sampled_from(list(Method))),
        message_class=draw(st.sampled_from(list(Class))),
        transaction_id=draw(st.binary(min_size=12, max_size=12)),
        attributes=attributes,
    )


def _to_aioice(attributes: dict[str, Any]) -> dict[str, Any]:
    out = dict(attributes)
    if "REQUESTED-TRANSPORT" in out:
        out["REQUESTED-TRANSPORT"] = out["REQUESTED-TRANSPORT"] << 24
    return out


def _comparable(attributes: dict[str, Any], *, from_aioice: bool = False) -> dict[str, Any]:
    out = {}
    for name, value in attributes.items():
        if name in ("MESSAGE-INTEGRITY", "FINGERPRINT") or name in OURS_ONLY:
            continue
        if name in ADDRESS_NAMES:
            out[name] = (ipaddress.ip_address(value[0]), value[1])
        elif name == "REQUESTED-TRANSPORT" and from_aioice:
            out[name] = value >> 24
        else:
            out[name] = value
    return out


def _encode(msg: Message, mode: str, key: bytes) -> bytes:
    return msg.encode(key if mode == "integrity" else None, fingerprint=mode != "plain")


# -- (a) ours -> aioice -------------------------------------------------------------------

@SETTINGS
@given(msg=messages(ours_only=True), mode=st.sampled_from(MODES), key=KEYS)
def test_aioice_parses_what_we_encode(msg: Message, mode: str, key: bytes) -> None:
    data = _encode(msg, mode, key)
    theirs = aioice.parse_message(data)  # verifies FINGERPRINT itself when present
    assert theirs.message_method == msg.method
    assert theirs.message_class == msg.message_class
    assert theirs.transaction_id == msg.transaction_id
    assert _comparable(theirs.attributes, from_aioice=True) == _comparable(msg.attributes)
    assert ("FINGERPRINT" in theirs.attributes) == (mode != "plain")
    if mode == "integrity":
        assert theirs.check_message_integrity(key)
        assert not theirs.check_message_integrity(key + b"!")


# -- (b) aioice -> ours -------------------------------------------------------------------

@SETTINGS
@given(msg=messages(), mode=st.sampled_from(MODES), key=KEYS)
def test_we_parse_what_aioice_encodes(msg: Message, mode: str, key: bytes) -> None:
    theirs = aioice.Message(
        aioice.Method(msg.method),
        aioice.Class(msg.message_class),
        msg.transaction_id,
        _to_aioice(msg.attributes),
    )
    if mode == "integrity":
        theirs.add_message_integrity(key)
    elif mode == "fingerprint":
        theirs.add_fingerprint()
    data = bytes(theirs)
    ours = parse(data)
    assert (ours.method, ours.message_class) == (msg.method, msg.message_class)
    assert ours.transaction_id == msg.transaction_id
    assert _comparable(ours.attributes) == _comparable(msg.attributes)
    assert ours.unknown_required == []
    if mode != "plain":
        ours.check_fingerprint()
    if mode == "integrity":
        ours.check_integrity(key)
        try:
            ours.check_integrity(key + b"!")
            raise AssertionError("a wrong key verified")
        except IntegrityError as exc:
            assert str(exc) == "STUN message has a wrong MESSAGE-INTEGRITY"
    # Same attribute order and zero padding: the two encoders agree byte for byte.
    assert _encode(msg, mode, key) == data


# -- (c) hostile bytes --------------------------------------------------------------------

def _parse_survives(data: bytes) -> None:
    """``parse`` either returns a usable message or raises StunParseError, nothing else."""
    try:
        msg = parse(data)
    except StunParseError as exc:
        event(f"parse: {exc}")
        return
    event("parse: ok")
    for check in (lambda: msg.check_integrity(b"key"), msg.check_fingerprint):
        with contextlib.suppress(IntegrityError):
            check()
    repr(msg)
    again = parse(msg.encode())
    assert again.attributes.keys() == msg.attributes.keys()


def _channel_survives(data: bytes) -> None:
    try:
        channel, payload = parse_channel_data(data)
    except StunParseError:
        return
    assert 0x4000 <= channel <= 0x4FFF
    assert len(payload) <= len(data) - 4


def _stream_survives(data: bytes) -> None:
    try:
        length = stream_frame_length(data)
    except StunParseError:
        return
    assert length is None or 4 <= length <= len(data)


def _all_survive(data: bytes) -> None:
    _parse_survives(data)
    _channel_survives(data)
    _stream_survives(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _all_survive(data)


@FUZZ_SETTINGS
@given(
    msg_type=st.integers(0, 0x3FFF),
    tid=st.binary(min_size=12, max_size=12),
    body=st.binary(max_size=300),
)
def test_random_body_behind_a_valid_header(msg_type: int, tid: bytes, body: bytes) -> None:
    body += b"\x00" * (-len(body) % 4)
    _all_survive(struct.pack("!HHI12s", msg_type, len(body), COOKIE, tid) + body)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        channel = draw(st.integers(0x4000, 0x4FFF))
        payload = draw(st.binary(max_size=100))
        return encode_channel_data(channel, payload, stream=draw(st.booleans()))
    msg = draw(messages(ours_only=True))
    integrity = draw(st.sampled_from(["sha1", "sha256", "both"]))
    key = draw(st.sampled_from([None, b"key"]))
    return msg.encode(key, integrity=integrity, fingerprint=draw(st.booleans()))


def _flip(data: bytes, index: int, bit: int) -> bytes:
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = draw(valid_frames())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "length", "attr-length", "splice"]))
        if not data:
            break
        index = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data = _flip(data, index, draw(st.integers(0, 7)))
        elif kind == "truncate":
            data = data[:index]
        elif kind == "length" and len(data) >= 4:
            data = data[:2] + struct.pack("!H", draw(st.integers(0, 0xFFFF))) + data[4:]
        elif kind == "attr-length" and len(data) >= 24:
            at = 20 + 4 * draw(st.integers(0, (len(data) - 24) // 4))
            data = data[: at + 2] + struct.pack("!H", draw(st.integers(0, 0xFFFF))) + data[at + 4 :]
        elif kind == "splice":
            data = data[:index] + draw(st.binary(max_size=8)) + data[index:]
    return data


@FUZZ_SETTINGS
@given(mutated_frames())
def test_mutated_messages(data: bytes) -> None:
    _all_survive(data)
