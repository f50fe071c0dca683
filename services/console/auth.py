"""Who may use the console's APIs: a verified bearer token (ES256, the issuer's keys, the
checks of :func:`services.auth.tokens.verify_token`) whose ``system/`` or ``user/`` scopes read
ImagingStudy. A patient's token opens no console API, whatever its scopes (403)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from services.auth.jwks import RemoteKeySet, parse_jwks
from services.auth.scopes import READ, AuthError, Grant
from services.auth.tokens import bearer_token, verify_token

#: What every console API reads.
RESOURCE = "ImagingStudy"
#: Scope contexts of staff and backends (``patient/`` is a patient's).
STAFF_CONTEXTS = ("system", "user")
#: The challenge of a request that brought no token (RFC 6750 §3: no error code then).
CHALLENGE = 'Bearer realm="scanwatch"'


class FileKeySet:
    """The public keys of a JWK Set file (read once; the issuer's private key-set file works:
    only the public halves are taken)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, ec.EllipticCurvePublicKey] | None = None

    def key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        if self._keys is None:
            try:
                self._keys = parse_jwks(self.path.read_bytes())
            except (OSError, ValueError, json.JSONDecodeError) as exc:
                raise AuthError(401, "the console cannot read its token keys") from exc
        return self._keys.get(kid)


class Verifier:
    """Checks a request's ``Authorization`` header; returns the staff grant."""

    def __init__(
        self,
        key_for: Callable[[str], ec.EllipticCurvePublicKey | None],
        audience: str,
        issuer: str,
    ) -> None:
        self.key_for = key_for
        self.audience = audience
        self.issuer = issuer

    @classmethod
    def remote(cls, keys: RemoteKeySet, audience: str) -> Verifier:
        return cls(keys.key, audience, keys.issuer)

    def check(self, authorization: str | None) -> Grant:
        """The grant (blocking: may fetch the JWKS); :class:`AuthError` 401 or 403."""
        grant = verify_token(bearer_token(authorization), self.key_for, self.audience, self.issuer)
        if grant.patient is not None or any(s.context == "patient" for s in grant.scopes):
            raise AuthError(403, "a patient's token opens no console API")
        if not any(s.context in STAFF_CONTEXTS and s.allows(RESOURCE, READ) for s in grant.scopes):
            raise AuthError(403, "the token needs a system/ or user/ scope that reads ImagingStudy")
        return grant

    async def acheck(self, authorization: str | None) -> Grant:
        return await asyncio.to_thread(self.check, authorization)
