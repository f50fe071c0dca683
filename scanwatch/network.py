"""Which addresses only this machine can reach: the rule every service applies before it
allows a development default (no authentication, no allow-list) on the address it binds."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback interface (only this machine can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_off_loopback(host: str, setting: str, present: bool, why: str) -> None:
    """The rule itself: a service bound to ``host`` that other machines can reach must have
    ``setting`` (named as its environment variable, so the message says what to set);
    :class:`ValueError` naming it otherwise. On loopback an unset value is a development
    default and allowed."""
    if not present and not is_loopback(host):
        raise ValueError(
            f"{host!r} is not loopback (other machines can reach it): set {setting} ({why})"
        )
