"""The password policy and hashes of accounts (services/auth/passwords.py)."""

from __future__ import annotations

import pytest

from services.auth import passwords


@pytest.mark.parametrize(
    "password",
    ["x" * 11, "y" * 129, "qwerty123456", "Q1W2E3R4T5Y6", "abababababababab", "jane.doe-1990!!"],
)
def test_the_policy_refuses_short_long_common_and_username_passwords(password: str) -> None:
    with pytest.raises(passwords.PasswordRefused):
        passwords.check_policy(password, "jane.doe")


@pytest.mark.parametrize(
    "password", ["correct horse battery staple", "Zz9!" * 3, "é" * 3 + "abcdefghi"]
)
def test_the_policy_accepts_long_uncommon_passwords(password: str) -> None:
    passwords.check_policy(password, "jane.doe")


def test_the_common_list_is_the_shipped_file_and_only_its_long_entries() -> None:
    common = passwords.common_passwords()
    assert len(common) > 150 and "qwerty123456" in common
    assert all(passwords.MIN_LENGTH <= len(p) <= passwords.MAX_LENGTH for p in common)


def test_hashes_are_argon2id_and_verify_only_their_password() -> None:
    encoded = passwords.hash_password("correct horse battery staple")
    assert encoded.startswith("$argon2id$")
    assert passwords.verify_password(encoded, "correct horse battery staple")
    assert not passwords.verify_password(encoded, "correct horse battery stapl")
    assert not passwords.verify_password(None, "correct horse battery staple")
    assert not passwords.verify_password("not a hash", "x")
