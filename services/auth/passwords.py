"""Passwords of accounts: the policy a new one must meet, and its argon2id hash.

Policy (NIST SP 800-63B §5.1.1.2): 12 to 128 characters, anything allowed; not a password from
the common-password list shipped in ``data/common-passwords.txt`` (Django's list of 20,000
common passwords, its entries long enough to pass the length rule), not the username. No
composition rules: they make passwords harder to remember, not harder to guess.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 12
MAX_LENGTH = 128
COMMON_PASSWORDS = Path(__file__).resolve().parent / "data" / "common-passwords.txt"

#: argon2id with argon2-cffi's defaults (RFC 9106's second recommended option: 64 MiB, 3
#: passes, 4 lanes): about 50 ms a hash here.
HASHER = PasswordHasher()


class PasswordRefused(ValueError):
    """A password that does not meet the policy; the message says why, for the person."""


@cache
def common_passwords() -> frozenset[str]:
    lines = COMMON_PASSWORDS.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def check_policy(password: str, username: str = "") -> None:
    """:class:`PasswordRefused` unless ``password`` meets the policy."""
    if len(password) < MIN_LENGTH:
        raise PasswordRefused(f"Choose a password of at least {MIN_LENGTH} characters.")
    if len(password) > MAX_LENGTH:
        raise PasswordRefused(f"Choose a password of at most {MAX_LENGTH} characters.")
    lowered = password.lower()
    if lowered in common_passwords() or len(set(password)) < 4:
        raise PasswordRefused(
            "This password is too common and easy to guess. Choose another, for example "
            "a few unrelated words."
        )
    if username and username.lower() in lowered:
        raise PasswordRefused("The password must not contain your username.")


def hash_password(password: str) -> str:
    return HASHER.hash(password)


@cache
def _dummy_hash() -> str:
    """A hash no password matches in practice: verified against when there is no account, so
    that an unknown username takes as long to refuse as a wrong password."""
    return HASHER.hash("scanwatch: no such account")


def verify_password(encoded: str | None, password: str) -> bool:
    """Whether ``password`` matches the argon2 hash ``encoded`` (None: no account, same work)."""
    try:
        return HASHER.verify(encoded or _dummy_hash(), password) and encoded is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(encoded: str) -> bool:
    return HASHER.check_needs_rehash(encoded)
