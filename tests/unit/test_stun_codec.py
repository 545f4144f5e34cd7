"""The STUN/TURN codec: attribute table, header, integrity, errors, ChannelData, demux."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import itertools
import struct
from typing import Any

import pytest

from turnstorm.proto.stun import (
    ATTRIBUTES,
    ATTRIBUTES_BY_NAME,
    COOKIE,
    Class,
    IntegrityError,
    Message,
    Method,
    StunParseError,
    encode_channel_data,
    is_channel_data,
    is_stun,
    parse,
    parse_channel_data,
    stream_frame_length,
)

TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
KEY = b"VOkJxbRl1RmTxUk/WvJxBt"
INTEGRITY_NAMES = {"MESSAGE-INTEGRITY", "MESSAGE-INTEGRITY-SHA256", "FINGERPRINT"}

V4 = ("192.0.2.1", 32853)
V4_BODY = "0001" "8055" "c0000201"
V4_XOR_BODY = "0001" "a147" "e112a643"
V6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
V6_BODY = "0002" "8055" "20010db8123456780011223344556677"
V6_XOR_BODY = "0002" "a147" "0113a9faa5d3f179bc25f4b5bed2b9d9"


def _hex(text: str) -> str:
    return text.encode().hex()


# (name, value, attribute body in hex, with TID for XOR addresses): at least one per row.
CASES: list[tuple[str, Any, str]] = [
    ("MAPPED-ADDRESS", V4, V4_BODY),
    ("MAPPED-ADDRESS", V6, V6_BODY),
    ("USERNAME", "evtj:h6vY", _hex("evtj:h6vY")),
    ("USERNAME", "\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "e3839ee38388e383aae38383e382afe382b9"),
    ("MESSAGE-INTEGRITY", bytes(range(20)), bytes(range(20)).hex()),
    ("ERROR-CODE", (401, "Unauthorized"), "00000401" + _hex("Unauthorized")),
    ("ERROR-CODE", (508, ""), "00000508"),
    ("UNKNOWN-ATTRIBUTES", [0x0031, 0x7FFF, 0x0002], "00317fff0002"),
    ("CHANNEL-NUMBER", 0x4001, "40010000"),
    ("LIFETIME", 600, "00000258"),
    ("XOR-PEER-ADDRESS", V4, V4_XOR_BODY),
    ("XOR-PEER-ADDRESS", V6, V6_XOR_BODY),
    ("DATA", b"\x00\x01\x02", "000102"),
    ("DATA", b"", ""),
    ("REALM", "example.org", _hex("example.org")),
    ("NONCE", b"f//499k954d6OL34oL9FSTvy64sA", _hex("f//499k954d6OL34oL9FSTvy64sA")),
    ("XOR-RELAYED-ADDRESS", V4, V4_XOR_BODY),
    ("XOR-RELAYED-ADDRESS", V6, V6_XOR_BODY),
    ("REQUESTED-ADDRESS-FAMILY", 0x02, "02000000"),
    ("EVEN-PORT", True, "80"),
    ("EVEN-PORT", False, "00"),
    ("REQUESTED-TRANSPORT", 17, "11000000"),
    ("DONT-FRAGMENT", None, ""),
    ("MESSAGE-INTEGRITY-SHA256", bytes(range(32)), bytes(range(32)).hex()),
    ("XOR-MAPPED-ADDRESS", V4, V4_XOR_BODY),
    ("XOR-MAPPED-ADDRESS", V6, V6_XOR_BODY),
    ("RESERVATION-TOKEN", bytes(range(1, 9)), "0102030405060708"),
    ("PRIORITY", 0x6E0001FF, "6e0001ff"),
    ("USE-CANDIDATE", None, ""),
    ("SOFTWARE", "turnstorm 0.1", _hex("turnstorm 0.1")),
    ("ALTERNATE-SERVER", V4, V4_BODY),
    ("ALTERNATE-SERVER", V6, V6_BODY),
    ("FINGERPRINT", 0xE57A3BCF, "e57a3bcf"),
    ("ICE-CONTROLLED", 0x932FF9B151263B36, "932ff9b151263b36"),
    ("ICE-CONTROLLING", 2**64 - 1, "ffffffffffffffff"),
    ("RESPONSE-ORIGIN", V4, V4_BODY),
    ("RESPONSE-ORIGIN", V6, V6_BODY),
    ("OTHER-ADDRESS", V4, V4_BODY),
    ("OTHER-ADDRESS", V6, V6_BODY),
]
MESSAGE_CASES = [case for case in CASES if case[0] not in INTEGRITY_NAMES]


def _case_id(case: tuple[str, Any, str]) -> str:
    return f"{case[0]}-{case[2][:8] or 'empty'}"


def _raw(*attrs: tuple[int, bytes], msg_type: int = 0x0001, cookie: int = COOKIE) -> bytes:
    """A message assembled by hand (attributes zero-padded, header length exact)."""
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) % 4) for t, v in attrs
    )
    return struct.pack("!HHI12s", msg_type, len(body), cookie, TID) + body


def _error(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


# -- attribute table ----------------------------------------------------------------------

def test_every_attribute_row_has_a_case() -> None:
    assert {case[0] for case in CASES} == {row[1] for row in ATTRIBUTES}


def test_attribute_types_and_names_are_unique() -> None:
    assert len({row[0] for row in ATTRIBUTES}) == len(ATTRIBUTES)
    assert len(ATTRIBUTES_BY_NAME) == len(ATTRIBUTES)


@pytest.mark.parametrize(("name", "value", "body"), CASES, ids=[_case_id(c) for c in CASES])
def test_attribute_value_packs_and_unpacks(name: str, value: Any, body: str) -> None:
    _, _, pack, unpack = ATTRIBUTES_BY_NAME[name]
    assert pack(value, TID) == bytes.fromhex(body)
    assert unpack(bytes.fromhex(body), TID) == value


@pytest.mark.parametrize(
    ("name", "value", "body"), MESSAGE_CASES, ids=[_case_id(c) for c in MESSAGE_CASES]
)
def test_attribute_round_trips_in_a_message(name: str, value: Any, body: str) -> None:
    attr_type = ATTRIBUTES_BY_NAME[name][0]
    encoded = Message(Method.ALLOCATE, Class.REQUEST, TID, {name: value}).encode()
    assert encoded == _raw((attr_type, bytes.fromhex(body)), msg_type=0x0003)
    msg = parse(encoded)
    assert msg.attributes == {name: value}
    assert msg.unknown_required == []


def test_many_attributes_keep_their_order() -> None:
    attrs = {name: value for name, value, _ in MESSAGE_CASES}
    msg = parse(Message(Method.ALLOCATE, Class.RESPONSE, TID, attrs).encode())
    assert list(msg.attributes.items()) == list(attrs.items())


def test_repeated_attribute_keeps_the_first() -> None:
    data = _raw((0x000D, b"\x00\x00\x00\x01"), (0x000D, b"\x00\x00\x00\x02"))
    assert parse(data).attributes == {"LIFETIME": 1}


def test_encode_unknown_attribute_name() -> None:
    with pytest.raises(ValueError) as exc:
        Message(Method.BINDING, Class.REQUEST, TID, {"NO-SUCH": 1}).encode()
    assert _error(exc) == "unknown STUN attribute 'NO-SUCH'"


def test_encode_skips_integrity_names_in_attributes() -> None:
    msg = Message(Method.BINDING, Class.REQUEST, TID, {"FINGERPRINT": 1, "LIFETIME": 5})
    assert msg.encode() == _raw((0x000D, b"\x00\x00\x00\x05"))


def test_unknown_comprehension_required_types_are_collected() -> None:
    data = _raw(
        (0x0031, b"\x01"),
        (0x8031, b"optional"),
        (0x000D, b"\x00\x00\x02\x58"),
        (0x7FFF, b""),
    )
    msg = parse(data)
    assert msg.unknown_required == [0x0031, 0x7FFF]
    assert msg.attributes == {"LIFETIME": 600}


def test_repr_names_method_and_class() -> None:
    msg = Message(Method.ALLOCATE, Class.ERROR, TID, {"ERROR-CODE": (401, "Unauthorized")})
    assert repr(msg) == (
        "Message(ALLOCATE, ERROR, tid=b7e7a701bc34d686fa87dfae, "
        "{'ERROR-CODE': (401, 'Unauthorized')})"
    )
    assert repr(Message(0x0ABC, Class.REQUEST, TID)).startswith("Message(0xabc, REQUEST,")


# -- header -------------------------------------------------------------------------------

METHOD_BIT_POSITIONS = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13]  # M0..M11 (RFC 8489 5)


def _message_type(method: int, message_class: int) -> int:
    out = 0
    for bit, position in enumerate(METHOD_BIT_POSITIONS):
        if method >> bit & 1:
            out |= 1 << position
    c0, c1 = message_class >> 4 & 1, message_class >> 8 & 1
    return out | c0 << 4 | c1 << 8


@pytest.mark.parametrize(
    ("method", "message_class", "wire"),
    [
        (Method.BINDING, Class.REQUEST, 0x0001),
        (Method.BINDING, Class.INDICATION, 0x0011),
        (Method.BINDING, Class.RESPONSE, 0x0101),
        (Method.BINDING, Class.ERROR, 0x0111),
        (Method.ALLOCATE, Class.ERROR, 0x0113),
        (Method.REFRESH, Class.REQUEST, 0x0004),
        (Method.SEND, Class.INDICATION, 0x0016),
        (Method.DATA, Class.INDICATION, 0x0017),
        (Method.CREATE_PERMISSION, Class.RESPONSE, 0x0108),
        (Method.CHANNEL_BIND, Class.RESPONSE, 0x0109),
    ],
)
def test_known_message_types(method: int, message_class: int, wire: int) -> None:
    assert _message_type(method, message_class) == wire
    assert Message(method, message_class, TID).encode()[:2] == struct.pack("!H", wire)


@pytest.mark.parametrize(
    ("method", "message_class"),
    list(
        itertools.product(
            [*Method, 0x000F, 0x0010, 0x0070, 0x0080, 0x0F80, 0x0ABC, 0x0FFF], list(Class)
        )
    ),
)
def test_method_and_class_bits_interleave(method: int, message_class: int) -> None:
    encoded = Message(method, message_class, TID).encode()
    assert encoded == struct.pack("!HHI12s", _message_type(method, message_class), 0, COOKIE, TID)
    msg = parse(encoded)
    assert (msg.method, msg.message_class, msg.transaction_id) == (method, message_class, TID)
    assert msg.raw == encoded


# -- MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT -------------------------------

def _request() -> Message:
    return Message(Method.ALLOCATE, Class.REQUEST, TID, {"USERNAME": "alice", "LIFETIME": 600})


def _expected_mac(
    data: bytes, offset: int, size: int, digest: Any, key: bytes = KEY
) -> bytes:
    header = data[:2] + struct.pack("!H", offset + 4 + size - 20) + data[4:20]
    return hmac.new(key, header + data[20:offset], digest).digest()


@pytest.mark.parametrize("size", [0, 1, 16, 63, 64, 65, 200])
@pytest.mark.parametrize(
    ("integrity", "digest", "mac_size"),
    [("sha1", hashlib.sha1, 20), ("sha256", hashlib.sha256, 32)],
)
def test_integrity_matches_hmac_for_any_key_size(
    size: int, integrity: str, digest: Any, mac_size: int
) -> None:
    # Keys longer than the 64-byte block are hashed first (RFC 2104); the codec caches
    # the keyed hash states, so each key is used twice.
    key = bytes(range(size))
    for _ in range(2):
        data = _request().encode(key, integrity=integrity)
        offset = len(data) - 4 - mac_size
        assert data[-mac_size:] == _expected_mac(data, offset, mac_size, digest, key)
        parse(data).check_integrity(key)


def test_message_integrity_sha1() -> None:
    data = _request().encode(KEY)
    msg = parse(data)
    assert msg.integrity_offsets == {"MESSAGE-INTEGRITY": len(data) - 24}
    assert data[-24:-20] == b"\x00\x08\x00\x14"
    assert data[-20:] == _expected_mac(data, len(data) - 24, 20, hashlib.sha1)
    assert msg.attributes == {"USERNAME": "alice", "LIFETIME": 600}
    msg.check_integrity(KEY)
    with pytest.raises(IntegrityError) as exc:
        msg.check_integrity(b"other")
    assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY"


def test_message_integrity_sha256() -> None:
    data = _request().encode(KEY, integrity="sha256")
    msg = parse(data)
    assert msg.integrity_offsets == {"MESSAGE-INTEGRITY-SHA256": len(data) - 36}
    assert data[-36:-32] == b"\x00\x1c\x00\x20"
    assert data[-32:] == _expected_mac(data, len(data) - 36, 32, hashlib.sha256)
    msg.check_integrity(KEY)
    with pytest.raises(IntegrityError) as exc:
        msg.check_integrity(b"other")
    assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY-SHA256"


def test_message_integrity_both_sha1_first_and_sha256_preferred() -> None:
    data = _request().encode(KEY, integrity="both")
    msg = parse(data)
    sha1_at, sha256_at = len(data) - 60, len(data) - 36
    assert msg.integrity_offsets == {
        "MESSAGE-INTEGRITY": sha1_at,
        "MESSAGE-INTEGRITY-SHA256": sha256_at,
    }
    assert data[sha1_at + 4 : sha256_at] == _expected_mac(data, sha1_at, 20, hashlib.sha1)
    assert data[-32:] == _expected_mac(data, sha256_at, 32, hashlib.sha256)
    msg.check_integrity(KEY)
    # SHA-256 wins: a damaged SHA-1 MAC alone does not fail the check ...
    damaged = bytearray(data)
    damaged[sha1_at + 4] ^= 0xFF
    with pytest.raises(IntegrityError) as exc:
        parse(bytes(damaged)).check_integrity(KEY)
    # ... except that SHA-256 covers the SHA-1 attribute.
    assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY-SHA256"


def test_truncated_sha256_integrity_verifies() -> None:
    # RFC 8489 14.6: MESSAGE-INTEGRITY-SHA256 may be truncated to 16..32 bytes (4-aligned).
    prefix = _request().encode()
    offset = len(prefix)
    for size in (16, 20, 28):
        mac = _expected_mac(prefix, offset, size, hashlib.sha256)[:size]
        body = prefix[20:] + struct.pack("!HH", 0x001C, size) + mac
        data = prefix[:2] + struct.pack("!H", len(body)) + prefix[4:20] + body
        parse(data).check_integrity(KEY)
        with pytest.raises(IntegrityError) as exc:
            parse(data).check_integrity(b"other")
        assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY-SHA256"


def test_no_integrity() -> None:
    with pytest.raises(IntegrityError) as exc:
        parse(_request().encode()).check_integrity(KEY)
    assert _error(exc) == "STUN message has no MESSAGE-INTEGRITY"


def test_unknown_integrity_algorithm() -> None:
    with pytest.raises(ValueError) as exc:
        _request().encode(KEY, integrity="md5")
    assert _error(exc) == "unknown integrity algorithm 'md5'"


@pytest.mark.parametrize("key", [None, KEY])
def test_fingerprint(key: bytes | None) -> None:
    data = _request().encode(key, fingerprint=True)
    assert data[-8:-4] == b"\x80\x28\x00\x04"
    assert struct.unpack("!I", data[-4:])[0] == binascii.crc32(data[:-8]) ^ 0x5354554E
    msg = parse(data)
    assert msg.integrity_offsets["FINGERPRINT"] == len(data) - 8
    msg.check_fingerprint()
    if key is not None:
        msg.check_integrity(key)
    damaged = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(IntegrityError) as exc:
        parse(damaged).check_fingerprint()
    assert _error(exc) == "STUN message has a wrong FINGERPRINT"


def test_no_fingerprint() -> None:
    with pytest.raises(IntegrityError) as exc:
        parse(_request().encode(KEY)).check_fingerprint()
    assert _error(exc) == "STUN message has no FINGERPRINT"


def _append(data: bytes, attr_type: int, value: bytes) -> bytes:
    body = data[20:] + struct.pack("!HH", attr_type, len(value)) + value
    body += b"\x00" * (-len(value) % 4)
    return data[:2] + struct.pack("!H", len(body)) + data[4:20] + body


@pytest.mark.parametrize("integrity", ["sha1", "sha256", "both"])
def test_attributes_after_integrity_are_ignored(integrity: str) -> None:
    data = _append(_request().encode(KEY, integrity=integrity), 0x8022, b"injected")
    data = _append(data, 0x000D, b"\x00\x00\x00\x01")
    msg = parse(data)
    assert msg.attributes == {"USERNAME": "alice", "LIFETIME": 600}
    msg.check_integrity(KEY)


def test_fingerprint_after_integrity_is_kept() -> None:
    data = _request().encode(KEY, fingerprint=True)
    msg = parse(data)
    assert set(msg.integrity_offsets) == {"MESSAGE-INTEGRITY", "FINGERPRINT"}
    msg.check_integrity(KEY)
    msg.check_fingerprint()


def test_attribute_after_fingerprint_is_an_error() -> None:
    data = _append(_request().encode(fingerprint=True), 0x000D, b"\x00\x00\x00\x01")
    with pytest.raises(StunParseError) as exc:
        parse(data)
    assert _error(exc) == "STUN attribute follows FINGERPRINT"


# -- parse errors, verbatim ---------------------------------------------------------------

def _parse_error(data: bytes) -> str:
    with pytest.raises(StunParseError) as exc:
        parse(data)
    return _error(exc)


GOOD = _raw((0x000D, b"\x00\x00\x02\x58"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "STUN message length is less than 20 bytes"),
        (GOOD[:19], "STUN message length is less than 20 bytes"),
        (b"\x80" + GOOD[1:], "STUN message type has the top two bits set"),
        (b"\x40" + GOOD[1:], "STUN message type has the top two bits set"),
        (GOOD[:4] + b"\x21\x12\xa4\x43" + GOOD[8:], "STUN message has an invalid magic cookie"),
        (
            GOOD[:2] + b"\x00\x06" + GOOD[4:20] + b"\x00\x00\x00\x00\x00\x00",
            "STUN message length is not a multiple of 4",
        ),
        (GOOD[:-4], "STUN message length does not match the datagram"),
        (GOOD + b"\x00\x00\x00\x00", "STUN message length does not match the datagram"),
        (
            GOOD[:2] + b"\x00\x0c" + GOOD[4:],
            "STUN message length does not match the datagram",
        ),
        (
            _raw((0x000D, b"\x00\x00\x02\x58"))[:22] + b"\x00\x05" + GOOD[24:],
            "STUN attribute length exceeds the message",
        ),
        (
            _raw((0x8022, b"abcd"))[:22] + b"\xff\xffabcd",
            "STUN attribute length exceeds the message",
        ),
    ],
    ids=[
        "empty", "19-bytes", "top-bit", "second-bit", "cookie", "length-not-aligned",
        "datagram-short", "datagram-long", "header-length-long", "attr-truncated",
        "attr-length-huge",
    ],
)
def test_header_and_framing_errors(data: bytes, message: str) -> None:
    assert _parse_error(data) == message


@pytest.mark.parametrize(
    ("attr_type", "value", "message"),
    [
        (0x0001, b"\x00\x01\x00", "STUN address length is less than 4 bytes"),
        (0x0001, b"\x00\x01\x00\x01\xc0\x00\x02", "STUN address has invalid length for IPv4"),
        (0x0001, b"\x00\x01\x00\x01" + bytes(16), "STUN address has invalid length for IPv4"),
        (0x0001, b"\x00\x02\x00\x01" + bytes(4), "STUN address has invalid length for IPv6"),
        (0x0001, b"\x00\x03\x00\x01" + bytes(4), "STUN address has unknown protocol 0x03"),
        (0x0020, b"\x00\x01", "STUN address length is less than 4 bytes"),
        (0x0020, b"\x00\x01\x00\x01" + bytes(8), "STUN address has invalid length for IPv4"),
        (0x0020, b"\x00\x02\x00\x01" + bytes(4), "STUN address has invalid length for IPv6"),
        (0x0020, b"\x00\x02\x00\x01" + bytes(20), "STUN address has invalid length for IPv6"),
        (0x0012, b"\x00\x00\x00\x01" + bytes(4), "STUN address has unknown protocol 0x00"),
        (0x0016, b"\x00\x01\x00\x01" + bytes(3), "STUN address has invalid length for IPv4"),
        (0x0006, b"\xff\xfe", "STUN text attribute is not valid UTF-8"),
        (0x8022, b"\xc3", "STUN text attribute is not valid UTF-8"),
        (0x0009, b"\x00\x00\x04", "STUN ERROR-CODE attribute is shorter than 4 bytes"),
        (0x0009, b"\x00\x00\x04\x01\xff", "STUN text attribute is not valid UTF-8"),
        (0x000A, b"\x00\x01\x00", "STUN UNKNOWN-ATTRIBUTES attribute has an odd length"),
        (0x000C, b"\x40\x00", "STUN CHANNEL-NUMBER attribute has invalid length 2"),
        (0x000D, b"\x00\x00\x01", "STUN LIFETIME attribute has invalid length 3"),
        (0x0017, b"\x01", "STUN REQUESTED-ADDRESS-FAMILY attribute has invalid length 1"),
        (0x0018, b"\x80\x00\x00\x00", "STUN EVEN-PORT attribute has invalid length"),
        (0x0019, b"\x11\x00", "STUN REQUESTED-TRANSPORT attribute has invalid length 2"),
        (0x0022, bytes(4), "STUN RESERVATION-TOKEN attribute has invalid length 4"),
        (0x0024, bytes(8), "STUN PRIORITY attribute has invalid length 8"),
        (0x8029, bytes(4), "STUN 64-bit attribute has invalid length 4"),
        (0x802A, bytes(12), "STUN 64-bit attribute has invalid length 12"),
        (0x0008, bytes(16), "STUN MESSAGE-INTEGRITY attribute has invalid length 16"),
        (0x001C, bytes(12), "STUN MESSAGE-INTEGRITY-SHA256 attribute has invalid length 12"),
        (0x001C, bytes(36), "STUN MESSAGE-INTEGRITY-SHA256 attribute has invalid length 36"),
        (0x001C, bytes(18), "STUN MESSAGE-INTEGRITY-SHA256 attribute has invalid length 18"),
        (0x8028, bytes(8), "STUN FINGERPRINT attribute has invalid length 8"),
    ],
)
def test_attribute_errors(attr_type: int, value: bytes, message: str) -> None:
    assert _parse_error(_raw((attr_type, value))) == message


def test_parse_accepts_bytearray_and_memoryview() -> None:
    data = _request().encode(KEY, fingerprint=True)
    for view in (bytearray(data), memoryview(data)):
        msg = parse(view)  # type: ignore[arg-type]
        assert msg.raw == data
        msg.check_integrity(KEY)
        msg.check_fingerprint()


# -- ChannelData --------------------------------------------------------------------------

@pytest.mark.parametrize("channel", [0x4000, 0x4001, 0x4ABC, 0x4FFF])
def test_channel_data_round_trip(channel: int) -> None:
    frame = encode_channel_data(channel, b"hello")
    assert frame == struct.pack("!HH", channel, 5) + b"hello"
    assert parse_channel_data(frame) == (channel, b"hello")


@pytest.mark.parametrize(
    ("payload", "padding"), [(b"", 0), (b"a", 3), (b"ab", 2), (b"abc", 1), (b"abcd", 0)]
)
def test_channel_data_stream_padding(payload: bytes, padding: int) -> None:
    frame = encode_channel_data(0x4000, payload, stream=True)
    assert frame == struct.pack("!HH", 0x4000, len(payload)) + payload + b"\x00" * padding
    assert len(frame) % 4 == 0
    assert parse_channel_data(frame) == (0x4000, payload)
    assert stream_frame_length(frame) == len(frame)


@pytest.mark.parametrize(
    ("channel", "text"), [(0x3FFF, "0x3fff"), (0x5000, "0x5000"), (0, "0x0000")]
)
def test_channel_number_out_of_range(channel: int, text: str) -> None:
    with pytest.raises(ValueError) as exc:
        encode_channel_data(channel, b"x")
    assert _error(exc) == f"channel number {text} is outside 0x4000-0x4FFF"
    with pytest.raises(StunParseError) as parse_exc:
        parse_channel_data(struct.pack("!HH", channel, 1) + b"x")
    assert _error(parse_exc) == f"ChannelData channel number {text} is invalid"


def test_channel_data_payload_too_long() -> None:
    assert len(encode_channel_data(0x4000, bytes(0xFFFF))) == 0xFFFF + 4
    with pytest.raises(ValueError) as exc:
        encode_channel_data(0x4000, bytes(0x10000))
    assert _error(exc) == "ChannelData payload is longer than 65535 bytes"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "ChannelData message is shorter than 4 bytes"),
        (b"\x40\x00\x00", "ChannelData message is shorter than 4 bytes"),
        (b"\x40\x00\x00\x05abcd", "ChannelData length exceeds the datagram"),
        (b"\x40\x00\xff\xff", "ChannelData length exceeds the datagram"),
    ],
)
def test_channel_data_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(StunParseError) as exc:
        parse_channel_data(data)
    assert _error(exc) == message


def test_stream_frame_length_stun() -> None:
    data = _request().encode(KEY)
    assert stream_frame_length(b"") is None
    assert stream_frame_length(data[:3]) is None
    assert stream_frame_length(data[:4]) is None
    assert stream_frame_length(data[:-1]) is None
    assert stream_frame_length(data) == len(data)
    assert stream_frame_length(data + b"\x40\x00") == len(data)


def test_stream_frame_length_channel_data() -> None:
    frame = encode_channel_data(0x4001, b"hello", stream=True)
    assert len(frame) == 12
    assert stream_frame_length(frame[:4]) is None
    assert stream_frame_length(frame[:9]) is None  # payload present, padding not yet
    assert stream_frame_length(frame[:11]) is None
    assert stream_frame_length(frame) == 12
    assert stream_frame_length(frame + frame) == 12


@pytest.mark.parametrize("first", [0x50, 0x7F, 0x80, 0xC0, 0xFF])
def test_stream_frame_length_invalid_first_byte(first: int) -> None:
    with pytest.raises(StunParseError) as exc:
        stream_frame_length(bytes([first, 0, 0, 0]))
    assert _error(exc) == f"stream frame starts with invalid byte 0x{first:02x}"


def test_stream_splits_mixed_frames() -> None:
    stun = _request().encode(KEY, fingerprint=True)
    channel = encode_channel_data(0x4002, b"abcdefg", stream=True)
    stream = stun + channel + stun + channel
    frames = []
    while stream:
        length = stream_frame_length(stream)
        assert length is not None
        frames.append(stream[:length])
        stream = stream[length:]
    assert frames == [stun, channel, stun, channel]
    assert parse(frames[0]).attributes == {"USERNAME": "alice", "LIFETIME": 600}
    assert parse_channel_data(frames[1]) == (0x4002, b"abcdefg")


# -- demultiplexing (RFC 7983) ------------------------------------------------------------

def test_demux() -> None:
    stun = _request().encode()
    channel = encode_channel_data(0x4000, b"data")
    assert is_stun(stun)
    assert not is_channel_data(stun)
    assert is_channel_data(channel)
    assert not is_stun(channel)
    assert not is_stun(stun[:19])
    assert not is_stun(stun[:4] + b"\x00\x00\x00\x00" + stun[8:])
    assert not is_stun(b"\x40" + stun[1:])
    assert not is_channel_data(b"\x40\x00\x00")
    assert is_channel_data(b"\x4f\xff\x00\x00")
    assert not is_channel_data(b"\x50\x00\x00\x00")
    assert not is_channel_data(b"\x3f\xff\x00\x00")
    assert not is_channel_data(b"\x80\x00\x00\x00")  # RTP/RTCP (RFC 7983: 128..191)
    assert not is_stun(b"\x16\xfe\xfd" + bytes(30))  # DTLS (20..63) without a cookie
