"""RFC 5769 test vectors, byte for byte.

The vectors pad USERNAME and SOFTWARE with spaces (0x20) where we pad with zeros; both are
legal (RFC 8489 section 14: padding content is ignored but covered by the HMAC and CRC),
so a re-encoding equals the vector once the padding is zeroed and MI/FINGERPRINT are
recomputed over the zeroed bytes.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
import unicodedata

import pytest

from turnstorm.proto.credentials import long_term_key
from turnstorm.proto.stun import Class, IntegrityError, Message, Method, parse

SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# 2.1 Sample Request
REQUEST = bytes.fromhex(
    "00010058" "2112a442" "b7e7a701" "bc34d686" "fa87dfae"
    "80220010" "5354554e" "20746573" "7420636c" "69656e74"  # SOFTWARE "STUN test client"
    "00240004" "6e0001ff"  # PRIORITY
    "80290008" "932ff9b1" "51263b36"  # ICE-CONTROLLED
    "00060009" "6576746a" "3a683676" "59202020"  # USERNAME "evtj:h6vY" + 3 spaces
    "00080014" "9aeaa70c" "bfd8cb56" "781ef2b5" "b2d3f249" "c1b571a2"  # MESSAGE-INTEGRITY
    "80280004" "e57a3bcf"  # FINGERPRINT
)

# 2.2 Sample IPv4 Response
RESPONSE_IPV4 = bytes.fromhex(
    "0101003c" "2112a442" "b7e7a701" "bc34d686" "fa87dfae"
    "8022000b" "74657374" "20766563" "746f7220"  # SOFTWARE "test vector" + 1 space
    "00200008" "0001a147" "e112a643"  # XOR-MAPPED-ADDRESS
    "00080014" "2b91f599" "fd9e90c3" "8c7489f9" "2af9ba53" "f06be7d7"
    "80280004" "c07d4c96"
)

# 2.3 Sample IPv6 Response
RESPONSE_IPV6 = bytes.fromhex(
    "01010048" "2112a442" "b7e7a701" "bc34d686" "fa87dfae"
    "8022000b" "74657374" "20766563" "746f7220"
    "00200014" "0002a147" "0113a9fa" "a5d3f179" "bc25f4b5" "bed2b9d9"
    "00080014" "a382954e" "4be67bf1" "1784c97c" "8292c275" "bfe3ed41"
    "80280004" "c8fb0b4c"
)

# 2.4 Sample Request with Long-Term Authentication (no FINGERPRINT, zero padding)
LONG_TERM_REQUEST = bytes.fromhex(
    "00010060" "2112a442" "78ad3433" "c6ad72c0" "29da412e"
    "00060012" "e3839ee3" "8388e383" "aae38383" "e382afe3" "82b90000"  # USERNAME
    "0015001c" "662f2f34" "39396b39" "35346436" "4f4c3334" "6f4c3946" "53547679"
    "36347341"  # NONCE
    "0014000b" "6578616d" "706c652e" "6f726700"  # REALM "example.org"
    "00080014" "f6702465" "6dd64a3e" "02b8e071" "2e85c9a2" "8ca89666"
)
LT_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LT_PASSWORD = "The\u00adM\u00aatr\u2168"
LT_PASSWORD_PREPPED = "TheMatrIX"
LT_REALM = "example.org"
LT_NONCE = b"f//499k954d6OL34oL9FSTvy64sA"


def _error(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _resign(vector: bytes, padding: range, key: bytes, fingerprint: bool) -> bytes:
    """The vector with ``padding`` zeroed and MI (+ FINGERPRINT) recomputed by hand."""
    mi_offset = len(vector) - 24 - (8 if fingerprint else 0)
    prefix = bytearray(vector[:mi_offset])
    for i in padding:
        prefix[i] = 0
    struct.pack_into("!H", prefix, 2, mi_offset + 24 - 20)
    mac = hmac.new(key, bytes(prefix), hashlib.sha1).digest()
    out = bytes(prefix) + bytes.fromhex("00080014") + mac
    if fingerprint:
        out = out[:2] + struct.pack("!H", len(out) + 8 - 20) + out[4:]
        crc = binascii.crc32(out) ^ 0x5354554E
        out += bytes.fromhex("80280004") + struct.pack("!I", crc)
    return out


# -- 2.1 ----------------------------------------------------------------------------------

def test_request_parses() -> None:
    msg = parse(REQUEST)
    assert msg.method == Method.BINDING
    assert msg.message_class == Class.REQUEST
    assert msg.transaction_id == TID
    assert msg.attributes == {
        "SOFTWARE": "STUN test client",
        "PRIORITY": 0x6E0001FF,
        "ICE-CONTROLLED": 0x932FF9B151263B36,
        "USERNAME": "evtj:h6vY",
    }
    assert msg.unknown_required == []
    assert msg.integrity_offsets == {"MESSAGE-INTEGRITY": 76, "FINGERPRINT": 100}


def test_request_integrity_and_fingerprint_verify() -> None:
    msg = parse(REQUEST)
    msg.check_integrity(SHORT_TERM_PASSWORD)
    msg.check_fingerprint()


def test_request_wrong_password() -> None:
    with pytest.raises(IntegrityError) as exc:
        parse(REQUEST).check_integrity(b"VOkJxbRl1RmTxUk/WvJxBu")
    assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY"


def test_request_reencodes_to_vector() -> None:
    msg = Message(
        Method.BINDING,
        Class.REQUEST,
        TID,
        {
            "SOFTWARE": "STUN test client",
            "PRIORITY": 0x6E0001FF,
            "ICE-CONTROLLED": 0x932FF9B151263B36,
            "USERNAME": "evtj:h6vY",
        },
    )
    encoded = msg.encode(SHORT_TERM_PASSWORD, fingerprint=True)
    # Identical up to USERNAME's padding, which the RFC fills with spaces.
    assert encoded[:73] == REQUEST[:73]
    assert encoded == _resign(REQUEST, range(73, 76), SHORT_TERM_PASSWORD, fingerprint=True)
    reparsed = parse(encoded)
    reparsed.check_integrity(SHORT_TERM_PASSWORD)
    reparsed.check_fingerprint()


# -- 2.2 and 2.3 --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (RESPONSE_IPV4, ("192.0.2.1", 32853)),
        (RESPONSE_IPV6, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_response_parses_and_verifies(vector: bytes, address: tuple[str, int]) -> None:
    msg = parse(vector)
    assert msg.method == Method.BINDING
    assert msg.message_class == Class.RESPONSE
    assert msg.transaction_id == TID
    # The SOFTWARE value is 11 bytes; the 12th (a space) is padding.
    assert msg.attributes == {"SOFTWARE": "test vector", "XOR-MAPPED-ADDRESS": address}
    msg.check_integrity(SHORT_TERM_PASSWORD)
    msg.check_fingerprint()


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (RESPONSE_IPV4, ("192.0.2.1", 32853)),
        (RESPONSE_IPV6, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_response_reencodes_to_vector(vector: bytes, address: tuple[str, int]) -> None:
    msg = Message(
        Method.BINDING,
        Class.RESPONSE,
        TID,
        {"SOFTWARE": "test vector", "XOR-MAPPED-ADDRESS": address},
    )
    encoded = msg.encode(SHORT_TERM_PASSWORD, fingerprint=True)
    assert encoded[:35] == vector[:35]
    assert encoded[36:len(vector) - 32] == vector[36:-32]  # XOR-MAPPED-ADDRESS
    assert encoded == _resign(vector, range(35, 36), SHORT_TERM_PASSWORD, fingerprint=True)


# -- 2.4 ----------------------------------------------------------------------------------

def test_long_term_password_saslprep_form() -> None:
    # SASLprep (RFC 4013) maps U+00AD to nothing and NFKC-normalizes the rest; our key
    # derivation does not prep, so callers pass the prepped form.
    prepped = unicodedata.normalize("NFKC", LT_PASSWORD.replace("\u00ad", ""))
    assert prepped == LT_PASSWORD_PREPPED


def test_long_term_key_matches_md5() -> None:
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD_PREPPED)
    assert key == bytes.fromhex("e8ca7ad59d5eb0518e312911d2dab2a9")


def test_long_term_request_parses_and_verifies() -> None:
    msg = parse(LONG_TERM_REQUEST)
    assert msg.method == Method.BINDING
    assert msg.message_class == Class.REQUEST
    assert msg.transaction_id == bytes.fromhex("78ad3433c6ad72c029da412e")
    assert msg.attributes == {"USERNAME": LT_USERNAME, "NONCE": LT_NONCE, "REALM": LT_REALM}
    msg.check_integrity(long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD_PREPPED))
    with pytest.raises(IntegrityError) as exc:
        msg.check_fingerprint()
    assert _error(exc) == "STUN message has no FINGERPRINT"


def test_long_term_request_reencodes_byte_exact() -> None:
    msg = Message(
        Method.BINDING,
        Class.REQUEST,
        bytes.fromhex("78ad3433c6ad72c029da412e"),
        {"USERNAME": LT_USERNAME, "NONCE": LT_NONCE, "REALM": LT_REALM},
    )
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD_PREPPED)
    assert msg.encode(key) == LONG_TERM_REQUEST


# -- tampering ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("vector", "index"),
    [
        (REQUEST, 24),  # SOFTWARE value
        (REQUEST, 74),  # USERNAME padding: covered by the HMAC and the CRC
        (REQUEST, 1),  # message type
        (REQUEST, 10),  # transaction id
        (RESPONSE_IPV4, 36),  # XOR-MAPPED-ADDRESS address
        (RESPONSE_IPV6, 50),  # IPv6 address
        (RESPONSE_IPV4, 60),  # the MAC itself
    ],
    ids=["software", "padding", "type", "tid", "ipv4", "ipv6", "mac"],
)
def test_flipped_byte_fails_integrity_and_fingerprint(vector: bytes, index: int) -> None:
    msg = parse(_flip(vector, index))
    with pytest.raises(IntegrityError) as exc:
        msg.check_integrity(SHORT_TERM_PASSWORD)
    assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY"
    with pytest.raises(IntegrityError) as exc:
        msg.check_fingerprint()
    assert _error(exc) == "STUN message has a wrong FINGERPRINT"


def test_flipped_fingerprint_leaves_integrity_intact() -> None:
    msg = parse(_flip(REQUEST, len(REQUEST) - 1))
    msg.check_integrity(SHORT_TERM_PASSWORD)
    with pytest.raises(IntegrityError) as exc:
        msg.check_fingerprint()
    assert _error(exc) == "STUN message has a wrong FINGERPRINT"


def test_long_term_flipped_nonce_fails_integrity() -> None:
    msg = parse(_flip(LONG_TERM_REQUEST, 50))
    with pytest.raises(IntegrityError) as exc:
        msg.check_integrity(long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD_PREPPED))
    assert _error(exc) == "STUN message has a wrong MESSAGE-INTEGRITY"
