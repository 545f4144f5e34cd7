"""STUN (RFC 8489) and TURN (RFC 8656) message codec.

Sans-I/O: bytes in, messages out. Attributes live in one table of
``(type, name, pack, unpack)`` rows; adding an attribute is adding a row.

A parsed :class:`Message` keeps its raw bytes, so integrity can be checked
after parsing, once the caller knows which key applies.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

COOKIE = 0x2112A442
COOKIE_BYTES = struct.pack("!I", COOKIE)
FINGERPRINT_XOR = 0x5354554E
HEADER_LENGTH = 20
IPV4_PROTOCOL = 0x01
IPV6_PROTOCOL = 0x02
UDP_TRANSPORT = 17
TCP_TRANSPORT = 6

Address = tuple[str, int]


class StunParseError(ValueError):
    """Bytes that are not a well-formed STUN message (or ChannelData frame)."""


class IntegrityError(ValueError):
    """A MESSAGE-INTEGRITY(-SHA256) or FINGERPRINT that does not verify."""


class Class(IntEnum):
    REQUEST = 0x000
    INDICATION = 0x010
    RESPONSE = 0x100
    ERROR = 0x110


class Method(IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


# -- attribute value packers --------------------------------------------------------------

def _pack_address(value: Address, tid: bytes) -> bytes:
    host, port = value
    if ":" in host:
        return struct.pack("!BBH", 0, IPV6_PROTOCOL, port) + socket.inet_pton(
            socket.AF_INET6, host
        )
    return struct.pack("!BBH", 0, IPV4_PROTOCOL, port) + socket.inet_aton(host)


def _unpack_address(data: bytes, tid: bytes) -> Address:
    if len(data) < 4:
        raise StunParseError("STUN address length is less than 4 bytes")
    family = data[1]
    port = (data[2] << 8) | data[3]
    if family == IPV4_PROTOCOL:
        if len(data) != 8:
            raise StunParseError("STUN address has invalid length for IPv4")
        return socket.inet_ntoa(data[4:8]), port
    if family == IPV6_PROTOCOL:
        if len(data) != 20:
            raise StunParseError("STUN address has invalid length for IPv6")
        return socket.inet_ntop(socket.AF_INET6, data[4:20]), port
    raise StunParseError(f"STUN address has unknown protocol 0x{family:02x}")


def _xor_bytes(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask[:n], "big")).to_bytes(n, "big")


def _xor_address_body(raw: bytes, tid: bytes) -> bytes:
    """XOR the port with the cookie's top 16 bits and the address with cookie + tid."""
    return raw[:2] + _xor_bytes(raw[2:4], COOKIE_BYTES) + _xor_bytes(raw[4:], COOKIE_BYTES + tid)


_XOR_IPV4 = struct.Struct("!BBHI")


def _pack_xor_address(value: Address, tid: bytes) -> bytes:
    host, port = value
    if ":" not in host:
        # Fast path for IPv4, the common case on a TURN/STUN hot path.
        addr = int.from_bytes(socket.inet_aton(host), "big") ^ COOKIE
        return _XOR_IPV4.pack(0, IPV4_PROTOCOL, port ^ 0x2112, addr)
    return _xor_address_body(_pack_address(value, tid), tid)


def _unpack_xor_address(data: bytes, tid: bytes) -> Address:
    if len(data) < 4:
        raise StunParseError("STUN address length is less than 4 bytes")
    if data[1] == IPV4_PROTOCOL and len(data) == 8:
        # Fast path for IPv4: XOR each address byte with the cookie's byte.
        return (
            f"{data[4] ^ 0x21}.{data[5] ^ 0x12}.{data[6] ^ 0xA4}.{data[7] ^ 0x42}",
            ((data[2] << 8) | data[3]) ^ 0x2112,
        )
    return _unpack_address(_xor_address_body(data, tid), tid)


def _pack_bytes(value: bytes, tid: bytes) -> bytes:
    return bytes(value)


def _unpack_bytes(data: bytes, tid: bytes) -> bytes:
    return data


def _pack_string(value: str, tid: bytes) -> bytes:
    return value.encode("utf8")


def _unpack_string(data: bytes, tid: bytes) -> str:
    try:
        return data.decode("utf8")
    except UnicodeDecodeError as exc:
        raise StunParseError("STUN text attribute is not valid UTF-8") from exc


def _pack_none(value: None, tid: bytes) -> bytes:
    return b""


def _unpack_none(data: bytes, tid: bytes) -> None:
    return None


_Packer = Callable[[Any, bytes], bytes]
_Unpacker = Callable[[bytes, bytes], Any]


def _fixed(fmt: str, what: str) -> tuple[_Packer, _Unpacker]:
    packer = struct.Struct(fmt)
    size = packer.size

    def pack(value: int, tid: bytes) -> bytes:
        return packer.pack(value)

    def unpack(data: bytes, tid: bytes) -> int:
        if len(data) != size:
            raise StunParseError(f"STUN {what} attribute has invalid length {len(data)}")
        value: int = packer.unpack(data)[0]
        return value

    return pack, unpack


def _padded(fmt: str, what: str) -> tuple[_Packer, _Unpacker]:
    """A value in the first bytes of a 4-byte field; the rest is RFFU (sent as zero)."""
    packer = struct.Struct(fmt)
    rffu = b"\x00" * (4 - packer.size)

    def pack(value: int, tid: bytes) -> bytes:
        return packer.pack(value) + rffu

    def unpack(data: bytes, tid: bytes) -> int:
        if len(data) != 4:
            raise StunParseError(f"STUN {what} attribute has invalid length {len(data)}")
        value: int = packer.unpack_from(data)[0]
        return value

    return pack, unpack


def _pack_error_code(value: tuple[int, str], tid: bytes) -> bytes:
    code, reason = value
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf8")


def _unpack_error_code(data: bytes, tid: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise StunParseError("STUN ERROR-CODE attribute is shorter than 4 bytes")
    code = (data[2] & 0x07) * 100 + data[3]
    return code, _unpack_string(data[4:], tid)


def _pack_unknown(value: list[int], tid: bytes) -> bytes:
    return struct.pack(f"!{len(value)}H", *value)


def _unpack_unknown(data: bytes, tid: bytes) -> list[int]:
    if len(data) % 2:
        raise StunParseError("STUN UNKNOWN-ATTRIBUTES attribute has an odd length")
    return list(struct.unpack(f"!{len(data) // 2}H", data))


def _pack_even_port(value: bool, tid: bytes) -> bytes:
    return b"\x80" if value else b"\x00"


def _unpack_even_port(data: bytes, tid: bytes) -> bool:
    if len(data) != 1:
        raise StunParseError("STUN EVEN-PORT attribute has invalid length")
    return bool(data[0] & 0x80)


def _pack_fixed_bytes(size: int, what: str, max_only: bool = False) -> tuple[
    Callable[[Any, bytes], bytes], Callable[[bytes, bytes], Any]
]:
    def unpack(data: bytes, tid: bytes) -> bytes:
        # MESSAGE-INTEGRITY-SHA256 may be truncated to 16..32 bytes, 4 at a time (14.6).
        if (len(data) > size or len(data) < 16 or len(data) % 4) if max_only else len(data) != size:
            raise StunParseError(f"STUN {what} attribute has invalid length {len(data)}")
        return data

    return _pack_bytes, unpack


_u16_pad = _padded("!H", "CHANNEL-NUMBER")
_u32 = _fixed("!I", "32-bit")
_u64 = _fixed("!Q", "64-bit")

# (type, name, pack, unpack): one row per attribute.
ATTRIBUTES: list[tuple[int, str, Callable[[Any, bytes], bytes], Callable[[bytes, bytes], Any]]] = [
    (0x0001, "MAPPED-ADDRESS", _pack_address, _unpack_address),
    (0x0006, "USERNAME", _pack_string, _unpack_string),
    (0x0008, "MESSAGE-INTEGRITY", *_pack_fixed_bytes(20, "MESSAGE-INTEGRITY")),
    (0x0009, "ERROR-CODE", _pack_error_code, _unpack_error_code),
    (0x000A, "UNKNOWN-ATTRIBUTES", _pack_unknown, _unpack_unknown),
    (0x000C, "CHANNEL-NUMBER", *_u16_pad),
    (0x000D, "LIFETIME", *_fixed("!I", "LIFETIME")),
    (0x0012, "XOR-PEER-ADDRESS", _pack_xor_address, _unpack_xor_address),
    (0x0013, "DATA", _pack_bytes, _unpack_bytes),
    (0x0014, "REALM", _pack_string, _unpack_string),
    (0x0015, "NONCE", _pack_bytes, _unpack_bytes),
    (0x0016, "XOR-RELAYED-ADDRESS", _pack_xor_address, _unpack_xor_address),
    (0x0017, "REQUESTED-ADDRESS-FAMILY", *_padded("!B", "REQUESTED-ADDRESS-FAMILY")),
    (0x0018, "EVEN-PORT", _pack_even_port, _unpack_even_port),
    (0x0019, "REQUESTED-TRANSPORT", *_padded("!B", "REQUESTED-TRANSPORT")),
    (0x001A, "DONT-FRAGMENT", _pack_none, _unpack_none),
    (0x001C, "MESSAGE-INTEGRITY-SHA256", *_pack_fixed_bytes(32, "MESSAGE-INTEGRITY-SHA256", True)),
    (0x0020, "XOR-MAPPED-ADDRESS", _pack_xor_address, _unpack_xor_address),
    (0x0022, "RESERVATION-TOKEN", *_pack_fixed_bytes(8, "RESERVATION-TOKEN")),
    (0x0024, "PRIORITY", *_fixed("!I", "PRIORITY")),
    (0x0025, "USE-CANDIDATE", _pack_none, _unpack_none),
    (0x8022, "SOFTWARE", _pack_string, _unpack_string),
    (0x8023, "ALTERNATE-SERVER", _pack_address, _unpack_address),
    (0x8028, "FINGERPRINT", *_fixed("!I", "FINGERPRINT")),
    (0x8029, "ICE-CONTROLLED", *_u64),
    (0x802A, "ICE-CONTROLLING", *_u64),
    (0x802B, "RESPONSE-ORIGIN", _pack_address, _unpack_address),
    (0x802C, "OTHER-ADDRESS", _pack_address, _unpack_address),
]
ATTRIBUTES_BY_TYPE = {row[0]: row for row in ATTRIBUTES}
ATTRIBUTES_BY_NAME = {row[1]: row for row in ATTRIBUTES}

_INTEGRITY_NAMES = frozenset({"MESSAGE-INTEGRITY", "MESSAGE-INTEGRITY-SHA256", "FINGERPRINT"})
_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")
"""Zero bytes that pad a value of length ``n`` to 4 bytes: ``_PADDING[n & 3]``."""

# Hot-path views of ATTRIBUTES. Encoding: name -> (type, pack), integrity rows left out.
# Parsing: type -> (name, unpack, is an integrity attribute).
_ENCODERS = {
    name: (attr_type, pack)
    for attr_type, name, pack, _ in ATTRIBUTES
    if name not in _INTEGRITY_NAMES
}
_DECODERS = {
    attr_type: (name, unpack, name in _INTEGRITY_NAMES)
    for attr_type, name, _, unpack in ATTRIBUTES
}


def random_transaction_id() -> bytes:
    return os.urandom(12)


@dataclass
class Message:
    """One STUN message.

    ``attributes`` maps attribute names (``"XOR-MAPPED-ADDRESS"``) to decoded values; when
    an attribute repeats, the first occurrence is kept (RFC 8489 section 14). Integrity
    attributes are not in ``attributes``: they are added by :meth:`encode` and checked by
    :meth:`check_integrity` / :meth:`check_fingerprint`.
    """

    method: int
    message_class: int
    transaction_id: bytes = field(default_factory=random_transaction_id)
    attributes: dict[str, Any] = field(default_factory=dict)
    unknown_required: list[int] = field(default_factory=list)
    """Comprehension-required attribute types this codec does not know (for a 420)."""
    raw: bytes = b""
    """The bytes this message was parsed from (empty for a message built locally)."""
    integrity_offsets: dict[str, int] = field(default_factory=dict)
    """Offset in ``raw`` of each integrity attribute's header."""

    def encode(
        self,
        key: bytes | None = None,
        *,
        integrity: str = "sha1",
        fingerprint: bool = False,
    ) -> bytes:
        """Serialize; with ``key``, append MESSAGE-INTEGRITY (``integrity="sha1"``),
        MESSAGE-INTEGRITY-SHA256 (``"sha256"``) or both (``"both"``)."""
        tid = self.transaction_id
        parts: list[bytes] = []
        append = parts.append
        attr_header = _ATTR_HEADER.pack
        encoders = _ENCODERS
        for name, value in self.attributes.items():
            entry = encoders.get(name)
            if entry is None:
                if name in _INTEGRITY_NAMES:
                    continue
                raise ValueError(f"unknown STUN attribute {name!r}")
            body = entry[1](value, tid)
            size = len(body)
            append(attr_header(entry[0], size))
            append(body)
            if size & 3:
                append(_PADDING[size & 3])
        payload = b"".join(parts)
        msg_type = _message_type(self.method, self.message_class)
        if key is not None:
            if integrity == "sha1":
                payload = _append_integrity(msg_type, tid, payload, 0x0008, key, "sha1")
            elif integrity == "sha256":
                payload = _append_integrity(msg_type, tid, payload, 0x001C, key, "sha256")
            elif integrity == "both":
                payload = _append_integrity(msg_type, tid, payload, 0x0008, key, "sha1")
                payload = _append_integrity(msg_type, tid, payload, 0x001C, key, "sha256")
            else:
                raise ValueError(f"unknown integrity algorithm {integrity!r}")
        if fingerprint:
            header = _HEADER.pack(msg_type, len(payload) + 8, COOKIE, tid)
            crc = binascii.crc32(payload, binascii.crc32(header)) ^ FINGERPRINT_XOR
            payload += _ATTR_HEADER.pack(0x8028, 4) + _U32.pack(crc)
        return _HEADER.pack(msg_type, len(payload), COOKIE, tid) + payload

    def check_integrity(self, key: bytes) -> None:
        """Verify MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY.

        Raises :class:`IntegrityError` when neither is present or the HMAC differs.
        """
        raw = self.raw
        for name, digest in (("MESSAGE-INTEGRITY-SHA256", "sha256"),
                             ("MESSAGE-INTEGRITY", "sha1")):
            offset = self.integrity_offsets.get(name)
            if offset is None:
                continue
            (length,) = _U16.unpack_from(raw, offset + 2)
            expected = raw[offset + 4:offset + 4 + length]
            # The HMAC covers the header with a length that ends at this attribute.
            header = raw[:2] + _U16.pack(offset + 4 + length - HEADER_LENGTH) + raw[4:HEADER_LENGTH]
            mac = _hmac(key, header + raw[HEADER_LENGTH:offset], digest)
            if not hmac.compare_digest(mac[:length], expected):
                raise IntegrityError(f"STUN message has a wrong {name}")
            return
        raise IntegrityError("STUN message has no MESSAGE-INTEGRITY")

    def check_fingerprint(self) -> None:
        offset = self.integrity_offsets.get("FINGERPRINT")
        if offset is None:
            raise IntegrityError("STUN message has no FINGERPRINT")
        (value,) = _U32.unpack_from(self.raw, offset + 4)
        if binascii.crc32(self.raw[:offset]) ^ FINGERPRINT_XOR != value:
            raise IntegrityError("STUN message has a wrong FINGERPRINT")

    def __repr__(self) -> str:
        try:
            method = Method(self.method).name
        except ValueError:
            method = f"0x{self.method:03x}"
        return (
            f"Message({method}, {Class(self.message_class).name}, "
            f"tid={self.transaction_id.hex()}, {self.attributes!r})"
        )


def _message_type(method: int, message_class: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | message_class
    )


_HMAC_PADS: dict[tuple[str, bytes], tuple[Any, Any]] = {}
_HMAC_PADS_MAX = 1024


def _hmac(key: bytes, data: bytes, algorithm: str) -> bytes:
    """HMAC (RFC 2104) with the keyed inner and outer hash states cached per key.

    Same result as ``hmac.digest``; a long-term key signs many messages, and building
    the OpenSSL HMAC context dominates the cost of a short message.
    """
    key = bytes(key)  # a hashable cache key, also for a bytearray
    cache_key = (algorithm, key)
    pads = _HMAC_PADS.get(cache_key)
    if pads is None:
        inner, outer = hashlib.new(algorithm), hashlib.new(algorithm)
        block = inner.block_size
        if len(key) > block:
            key = hashlib.new(algorithm, key).digest()
        key = key.ljust(block, b"\x00")
        inner.update(key.translate(_IPAD))
        outer.update(key.translate(_OPAD))
        if len(_HMAC_PADS) >= _HMAC_PADS_MAX:
            _HMAC_PADS.clear()
        pads = _HMAC_PADS[cache_key] = inner, outer
    inner = pads[0].copy()
    inner.update(data)
    outer = pads[1].copy()
    outer.update(inner.digest())
    digest: bytes = outer.digest()
    return digest


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


def _append_integrity(
    msg_type: int, tid: bytes, payload: bytes, attr: int, key: bytes, digest: str
) -> bytes:
    size = 20 if attr == 0x0008 else 32
    header = _HEADER.pack(msg_type, len(payload) + 4 + size, COOKIE, tid)
    mac = _hmac(key, header + payload, digest)
    return payload + _ATTR_HEADER.pack(attr, size) + mac


def parse(data: bytes) -> Message:
    """Parse one STUN message; raises :class:`StunParseError` and nothing else."""
    if len(data) < HEADER_LENGTH:
        raise StunParseError("STUN message length is less than 20 bytes")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise StunParseError("STUN message type has the top two bits set")
    if cookie != COOKIE:
        raise StunParseError("STUN message has an invalid magic cookie")
    if length & 3:
        raise StunParseError("STUN message length is not a multiple of 4")
    end = len(data)
    if end != HEADER_LENGTH + length:
        raise StunParseError("STUN message length does not match the datagram")
    if type(data) is not bytes:
        data = bytes(data)
    attributes: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    unknown: list[int] = []
    decoders = _DECODERS
    attr_header = _ATTR_HEADER.unpack_from
    protected = False  # a MESSAGE-INTEGRITY(-SHA256) was seen
    fingerprinted = False
    # The body length is a multiple of 4 and so is every padded attribute: each
    # attribute header is whole, and the padding never runs past the end.
    pos = HEADER_LENGTH
    while pos < end:
        attr_type, attr_len = attr_header(data, pos)
        start = pos + 4
        pos = start + attr_len
        if pos > end:
            raise StunParseError("STUN attribute length exceeds the message")
        entry = decoders.get(attr_type)
        if entry is None:
            if attr_type < 0x8000:
                unknown.append(attr_type)
        elif fingerprinted:
            raise StunParseError("STUN attribute follows FINGERPRINT")
        elif entry[2]:
            name = entry[0]
            if name not in offsets:
                entry[1](data[start:pos], tid)  # validates the length
                offsets[name] = start - 4
                if name == "FINGERPRINT":
                    fingerprinted = True
                else:
                    protected = True
        elif not protected:
            # Attributes after MESSAGE-INTEGRITY are ignored (RFC 8489 section 14.5).
            name = entry[0]
            if name not in attributes:
                attributes[name] = entry[1](data[start:pos], tid)
        pos += -attr_len & 3
    return Message(
        (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2),
        msg_type & 0x0110,
        tid,
        attributes,
        unknown,
        data,
        offsets,
    )


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 7983): first two bits 0 and the magic cookie."""
    return len(data) >= HEADER_LENGTH and data[0] < 0x40 and data[4:8] == COOKIE_BYTES


# -- ChannelData (RFC 8656 section 12.4) ----------------------------------------------------

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
_CHANNEL_HEADER = struct.Struct("!HH")


def is_channel_data(data: bytes) -> bool:
    return len(data) >= 4 and 0x40 <= data[0] <= 0x4F


def encode_channel_data(channel: int, payload: bytes, *, stream: bool = False) -> bytes:
    """Frame ``payload`` for ``channel``; over TCP/TLS (``stream``) pad to 4 bytes."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError(f"channel number 0x{channel:04x} is outside 0x4000-0x4FFF")
    if len(payload) > 0xFFFF:
        raise ValueError("ChannelData payload is longer than 65535 bytes")
    frame = _CHANNEL_HEADER.pack(channel, len(payload)) + payload
    if stream and len(payload) % 4:
        frame += b"\x00" * (4 - len(payload) % 4)
    return frame


def parse_channel_data(data: bytes) -> tuple[int, bytes]:
    """Parse one datagram-framed ChannelData message into ``(channel, payload)``."""
    if len(data) < 4:
        raise StunParseError("ChannelData message is shorter than 4 bytes")
    channel, length = _CHANNEL_HEADER.unpack_from(data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise StunParseError(f"ChannelData channel number 0x{channel:04x} is invalid")
    if length > len(data) - 4:
        raise StunParseError("ChannelData length exceeds the datagram")
    return channel, bytes(data[4:4 + length])


def stream_frame_length(buffer: bytes) -> int | None:
    """Bytes the next STUN or ChannelData frame takes in a TCP stream (None: need more).

    STUN messages are self-delimiting (20 + length); ChannelData over a stream is
    padded to a multiple of 4 (RFC 8656 section 12.5).
    """
    if len(buffer) < 4:
        return None
    first = buffer[0]
    (length,) = struct.unpack_from("!H", buffer, 2)
    if first < 0x40:
        total = HEADER_LENGTH + length
    elif first <= 0x4F:
        total = 4 + length + (-length % 4)
    else:
        raise StunParseError(f"stream frame starts with invalid byte 0x{first:02x}")
    return total if len(buffer) >= total else None
