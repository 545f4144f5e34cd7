"""TURN REST API ephemeral credentials and the long-term key (RFC 8489 section 9.2.2)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from turnstorm.proto.credentials import Credentials, long_term_key, rest_password

# openssl: printf '1700000000:alice' | openssl dgst -sha1 -hmac north -binary | base64
NORTH_ALICE_PASSWORD = "Cd/49soE35ICqcJF/bCTn8Z4OyE="
# printf 'alice:example.org:hunter2' | md5sum
ALICE_KEY = bytes.fromhex("7b3836a21615f9de19eea27a9b00ae12")


def test_rest_password_known_value() -> None:
    assert rest_password("north", "1700000000:alice") == NORTH_ALICE_PASSWORD
    mac = hmac.new(b"north", b"1700000000:alice", hashlib.sha1).digest()
    assert mac.hex() == "09dff8f6ca04df9202a9c245fdb0939fc6783b21"
    assert base64.b64encode(mac).decode() == NORTH_ALICE_PASSWORD


def test_ephemeral_username_is_expiry_colon_user() -> None:
    creds = Credentials.ephemeral("north", "alice", now=1_699_913_600, ttl=86400)
    assert creds == Credentials("1700000000:alice", NORTH_ALICE_PASSWORD)


def test_ephemeral_expiry_truncates_to_whole_seconds() -> None:
    creds = Credentials.ephemeral("north", "alice", now=1_699_999_999.75, ttl=0.5)
    assert creds.username == "1700000000:alice"
    assert creds.password == NORTH_ALICE_PASSWORD


def test_ephemeral_default_ttl_is_one_day() -> None:
    creds = Credentials.ephemeral("north", "alice", now=1_699_913_600)
    assert creds.username == "1700000000:alice"


def test_ephemeral_user_may_contain_colons() -> None:
    creds = Credentials.ephemeral("s3cr3t", "bob:test", now=0, ttl=60)
    assert creds.username == "60:bob:test"
    mac = hmac.new(b"s3cr3t", b"60:bob:test", hashlib.sha1).digest()
    assert creds.password == base64.b64encode(mac).decode()


@pytest.mark.parametrize("ttl", [0, -1, -0.5])
def test_ephemeral_needs_positive_ttl(ttl: float) -> None:
    with pytest.raises(ValueError) as exc:
        Credentials.ephemeral("north", "alice", now=1_700_000_000, ttl=ttl)
    assert str(exc.value) == "credential lifetime must be positive"


def test_long_term_key_is_md5_of_user_realm_password() -> None:
    assert long_term_key("alice", "example.org", "hunter2") == ALICE_KEY
    assert Credentials("alice", "hunter2").key("example.org") == ALICE_KEY


def test_long_term_key_utf8() -> None:
    # RFC 5769 2.4 (password already SASLprep'd).
    username = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    key = long_term_key(username, "example.org", "TheMatrIX")
    assert key == bytes.fromhex("e8ca7ad59d5eb0518e312911d2dab2a9")
    assert key == hashlib.md5(f"{username}:example.org:TheMatrIX".encode()).digest()


def test_rest_credentials_key_for_realm() -> None:
    creds = Credentials.ephemeral("north", "alice", now=1_699_913_600, ttl=86400)
    expected = hashlib.md5(f"1700000000:alice:turn.example:{NORTH_ALICE_PASSWORD}".encode())
    assert creds.key("turn.example") == expected.digest()
