"""Verify scanwatch access tokens against the public keys the authorization server publishes
(its JWKS, ``GET /auth/jwks``), without holding any key that can sign them: for processes
outside the FHIR API (the chatbot's action server, in its own virtualenv).

Standard library (``urllib``) + PyJWT + cryptography only, no web framework::

    keys = RemoteKeySet("http://127.0.0.1:8080/auth/jwks")
    grant = keys.verify(token)            # services.auth.scopes.Grant, or AuthError (401)
    grant.patient, grant.allows("Observation", "read")

The key set is cached for ``ttl`` seconds. A token naming a ``kid`` the cache lacks (a key
added since) makes it fetch again at once, but at most once per ``min_refresh_s``, so tokens
with made-up ``kid`` values cannot turn into a flood of requests. When a refresh fails, the
keys already known keep verifying (they were the server's); with none known,
:class:`KeySetUnavailable` says the server could not be asked (transient, not the token's fault).

Calls block on the network when they fetch: an ``asyncio`` caller runs :meth:`verify` in a
thread (``asyncio.to_thread``). It is thread-safe; one thread fetches at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from services.auth.scopes import Grant
from services.auth.tokens import TOKEN_AUDIENCE, TOKEN_ISSUER, public_key_from_jwk, verify_token

log = logging.getLogger(__name__)

#: Seconds a fetched key set is used before it is fetched again.
DEFAULT_TTL_S = 300.0
#: Fewest seconds between two fetches (an unknown ``kid`` asks again no sooner).
DEFAULT_MIN_REFRESH_S = 5.0
#: HTTP timeout of one fetch.
DEFAULT_TIMEOUT_S = 5.0
#: Largest JWKS document read.
MAX_JWKS_BYTES = 256_000


class KeySetUnavailable(Exception):
    """The JWKS could not be fetched or read, and no key is known yet (transient: retry)."""


def parse_jwks(document: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The ES256 verification keys of a JWKS document, by ``kid``. Keys of other kinds are
    skipped (a set may hold them); a document that is not a JWK Set is a :class:`ValueError`."""
    data = json.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('a JWKS is a JSON object with a "keys" list')
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict):
            continue
        try:
            kid, key = public_key_from_jwk(jwk)
        except ValueError as exc:
            log.info("JWKS key skipped", extra={"kid": str(jwk.get("kid")), "reason": str(exc)})
            continue
        keys[kid] = key
    return keys


def fetch_jwks(
    url: str, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, ec.EllipticCurvePublicKey]:
    """GET the JWKS at ``url`` (http or https): its ES256 keys by ``kid``;
    :class:`KeySetUnavailable` when it cannot be fetched or read."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"a JWKS URL is http(s), not {url!r}")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            document = response.read(MAX_JWKS_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise KeySetUnavailable(f"cannot fetch the JWKS at {url}: {exc}") from exc
    if len(document) > MAX_JWKS_BYTES:
        raise KeySetUnavailable(f"the JWKS at {url} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        return parse_jwks(document)
    except ValueError as exc:
        raise KeySetUnavailable(f"the JWKS at {url} is not usable: {exc}") from exc


class RemoteKeySet:
    """The verification keys published at ``url``, cached; verifies tokens with them."""

    def __init__(
        self,
        url: str,
        ttl: float = DEFAULT_TTL_S,
        *,
        issuer: str = TOKEN_ISSUER,
        min_refresh_s: float = DEFAULT_MIN_REFRESH_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a JWKS URL is http(s), not {url!r}")
        self.url = url
        self.ttl = ttl
        self.issuer = issuer
        self.min_refresh_s = min_refresh_s
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._loaded = False  # whether a fetch has succeeded
        self._error: str | None = None  # why the last fetch failed
        self._tried: float | None = None  # when the last fetch was tried
        self._expires = float("-inf")  # when the keys held are due to be fetched again
        #: Fetches tried so far (a measure of how often the server is asked).
        self.fetches = 0

    def verify(self, token: str, audience: str = TOKEN_AUDIENCE) -> Grant:
        """The grant of a valid token for ``audience`` (the same checks as the FHIR API's,
        :func:`services.auth.tokens.verify_token`); :class:`~services.auth.scopes.AuthError`
        401 otherwise, :class:`KeySetUnavailable` when no key could be fetched yet."""
        return verify_token(token, self.key, audience, self.issuer)

    def key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        """The public key named ``kid`` (a :data:`~services.auth.tokens.KeyLookup`): from the
        cache while it is fresh, else fetched; an unknown ``kid`` fetches again, at most once
        per :attr:`min_refresh_s`. :class:`KeySetUnavailable` while no fetch has succeeded."""
        with self._lock:
            now = self._clock()
            if now >= self._expires:
                self._refresh(now)
            key = self._keys.get(kid)
            if key is None:
                self._refresh(now)
                key = self._keys.get(kid)
            if not self._loaded:
                raise KeySetUnavailable(self._error or f"no keys fetched from {self.url} yet")
            return key

    def _refresh(self, now: float) -> None:
        """Fetch the key set, unless the last try was less than :attr:`min_refresh_s` ago."""
        if self._tried is not None and now - self._tried < self.min_refresh_s:
            return
        self._tried = now
        self.fetches += 1
        try:
            keys = fetch_jwks(self.url, self.timeout)
        except KeySetUnavailable as exc:
            self._error = str(exc)
            if self._loaded:
                log.warning(
                    "JWKS refresh failed; the keys known keep verifying", extra={"error": str(exc)}
                )
            return
        self._keys = keys
        self._loaded = True
        self._expires = now + self.ttl
