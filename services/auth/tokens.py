"""Access tokens: ES256 JWTs (ECDSA on P-256, RFC 7518 §3.4) issued by the token endpoint and
verified by every service that accepts them (import this module, or :mod:`services.auth.jwks`
where the process must not hold a key that can sign; never the FHIR API).

The signing keys live in a key-set file: a JWK Set (RFC 7517 §5) of private keys, mode 0600,
created with one key on first start (:func:`load_key_set`). The newest key (the last one)
signs; every key in the set verifies, so adding a key (:func:`rotate`) never invalidates the
tokens already issued. A token names its key in the ``kid`` header: the key's JWK thumbprint
(RFC 7638). The public halves are published as a JWKS (:meth:`KeySet.public_jwks`, served at
``/auth/jwks``).

:func:`verify_token` holds the checks every verifier makes (the local :class:`TokenService`
and the remote :class:`services.auth.jwks.RemoteKeySet` alike); only where the public key comes
from differs. Plain code on PyJWT + cryptography + the standard library: the chatbot's own
virtualenv imports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from scanwatch.durable import fsync_dir
from services.auth.scopes import AuthError, Grant, Scope, parse_scopes

log = logging.getLogger(__name__)

#: ``iss`` of the tokens issued and accepted (the value predates this package).
TOKEN_ISSUER = "scanwatch-fhir-api"
#: ``aud`` of the tokens for the FHIR API: the default audience issued and expected.
TOKEN_AUDIENCE = "scanwatch-fhir-api"
JWT_ALGORITHM = "ES256"
#: The JWK ``crv`` of ES256 keys, and its cryptography curve.
CURVE = "P-256"
_CURVE = ec.SECP256R1()
_COORDINATE_BYTES = 32
#: Clock skew between issuer and verifier tolerated on ``exp``, ``iat`` and ``nbf``.
LEEWAY = timedelta(seconds=30)
#: Claims a token must carry.
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "sub", "scope")
#: Keys :func:`rotate` keeps: the new one and the one before it (whose tokens still verify).
KEEP_KEYS = 2
#: The members of a published (public) key, in the order they are written.
PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "kid", "use", "alg")

#: Where a verifier gets the public key a ``kid`` names (None: no such key).
KeyLookup = Callable[[str], ec.EllipticCurvePublicKey | None]


def _now() -> datetime:
    return datetime.now(UTC)


def _b64(number: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(_COORDINATE_BYTES, "big")).rstrip(b"=").decode()


def _unb64(text: object, member: str) -> int:
    if not isinstance(text, str) or not text:
        raise ValueError(f"the key's {member!r} member is missing or not a string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise ValueError(f"the key's {member!r} member is not base64url") from exc
    if len(raw) != _COORDINATE_BYTES:
        raise ValueError(f"the key's {member!r} member is not {_COORDINATE_BYTES} bytes long")
    return int.from_bytes(raw, "big")


def thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's JWK thumbprint (RFC 7638, SHA-256, base64url): its ``kid``."""
    numbers = public_key.public_numbers()
    canonical = json.dumps(
        {"crv": CURVE, "kty": "EC", "x": _b64(numbers.x), "y": _b64(numbers.y)},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def public_jwk(public_key: ec.EllipticCurvePublicKey, kid: str) -> dict[str, str]:
    """The published form of a verification key (:data:`PUBLIC_MEMBERS` only)."""
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": CURVE,
        "x": _b64(numbers.x),
        "y": _b64(numbers.y),
        "kid": kid,
        "use": "sig",
        "alg": JWT_ALGORITHM,
    }


def public_key_from_jwk(jwk: Mapping[str, object]) -> tuple[str, ec.EllipticCurvePublicKey]:
    """(kid, public key) of an ES256 JWK; :class:`ValueError` for any other kind of key, a
    missing ``kid``, or a point that is not on the curve. Private members are ignored."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != CURVE:
        raise ValueError(f"not a {CURVE} EC key (kty {jwk.get('kty')!r}, crv {jwk.get('crv')!r})")
    if jwk.get("alg", JWT_ALGORITHM) != JWT_ALGORITHM or jwk.get("use", "sig") != "sig":
        raise ValueError("not an ES256 signature key (alg/use)")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("the key has no kid")
    numbers = ec.EllipticCurvePublicNumbers(
        _unb64(jwk.get("x"), "x"), _unb64(jwk.get("y"), "y"), _CURVE
    )
    return kid, numbers.public_key()  # raises ValueError when the point is not on the curve


@dataclass(frozen=True)
class SigningKey:
    """One ES256 key pair of a key set."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)  # kid says

    @classmethod
    def generate(cls) -> SigningKey:
        private_key = ec.generate_private_key(_CURVE)
        return cls(thumbprint(private_key.public_key()), private_key)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, object]) -> SigningKey:
        """The key pair of a private JWK (with ``d``) whose public half matches ``x``/``y``."""
        kid, public_key = public_key_from_jwk(jwk)
        private_key = ec.derive_private_key(_unb64(jwk.get("d"), "d"), _CURVE)
        if private_key.public_key().public_numbers() != public_key.public_numbers():
            raise ValueError(f"key {kid}: d does not belong to x/y")
        return cls(kid, private_key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        return public_jwk(self.public_key, self.kid)

    def private_jwk(self) -> dict[str, str]:
        """The JWK with the private member ``d``: for the key-set file only, never published."""
        d = self.private_key.private_numbers().private_value
        return {**self.public_jwk(), "d": _b64(d)}


@dataclass(frozen=True)
class KeySet:
    """The signing keys, oldest first: the last one signs, every one verifies."""

    keys: tuple[SigningKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key set needs at least one key")
        kids = [k.kid for k in self.keys]
        if len(set(kids)) != len(kids):
            raise ValueError("the key set names a kid twice")

    @classmethod
    def generate(cls) -> KeySet:
        """A set of one new key."""
        return cls((SigningKey.generate(),))

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> KeySet:
        """The key set of a private JWK Set document (``{"keys": [...]}``, each with ``d``)."""
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise ValueError('a key set is a JSON object with a "keys" list')
        return cls(tuple(SigningKey.from_jwk(k) for k in keys if isinstance(k, dict)))

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The private JWK Set (the key-set file's content)."""
        return {"keys": [k.private_jwk() for k in self.keys]}

    def public_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWK Set to publish: :data:`PUBLIC_MEMBERS` of each key, no ``d``."""
        return {"keys": [k.public_jwk() for k in self.keys]}

    @property
    def signing(self) -> SigningKey:
        """The key that signs new tokens (the newest)."""
        return self.keys[-1]

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        """The verification key named ``kid``, or None (a :data:`KeyLookup`)."""
        return next((k.public_key for k in self.keys if k.kid == kid), None)

    def with_new_key(self, keep: int = KEEP_KEYS) -> KeySet:
        """This set plus a new signing key, keeping the newest ``keep`` keys in all."""
        if keep < 2:
            raise ValueError("keep at least 2 keys: the previous key's tokens must still verify")
        return KeySet((*self.keys, SigningKey.generate())[-keep:])


def _write_private(path: Path, key_set: KeySet, *, replace: bool) -> bool:
    """Write ``key_set`` to ``path`` whole, mode 0600 from the first byte, durably. Without
    ``replace`` an existing file is left alone (another process created it first): False."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(key_set.to_jwks(), handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)  # atomic, and never over a file a concurrent start wrote
            except FileExistsError:
                return False
            finally:
                temp.unlink()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return True


def _read_private(path: Path) -> KeySet:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"the signing key set {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ValueError(
            f"the signing key set {path} holds private keys but other users may access it "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
        )
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"the signing key set {path} is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ValueError(f"the signing key set {path} is not a JWK Set")
    try:
        return KeySet.from_jwks(document)
    except ValueError as exc:
        raise ValueError(f"the signing key set {path} is not usable: {exc}") from exc


def load_key_set(path: Path) -> KeySet:
    """The key set in ``path``, created with one new key (mode 0600) when absent. Refuses
    (:class:`ValueError`) a file other users may read, or one that is not an ES256 key set.
    Processes starting together agree: the first to create the file wins, the others read it."""
    if not path.exists() and _write_private(path, KeySet.generate(), replace=False):
        log.info("created a new token signing key set", extra={"path": str(path)})
    return _read_private(path)


def rotate(path: Path, keep: int = KEEP_KEYS) -> SigningKey:
    """Add a new signing key to the key set in ``path`` (kept: the newest ``keep``); returns it.

    Tokens signed with the previous key keep verifying. Processes that loaded the set before
    sign with their copy until they load it again; remote verifiers fetch the new key the first
    time a token names it."""
    key_set = load_key_set(path).with_new_key(keep)
    _write_private(path, key_set, replace=True)
    log.info("added a token signing key", extra={"path": str(path), "kid": key_set.signing.kid})
    return key_set.signing


def verify_token(
    token: str,
    key_for: KeyLookup,
    audience: str = TOKEN_AUDIENCE,
    issuer: str = TOKEN_ISSUER,
) -> Grant:
    """The grant of a valid token; :class:`AuthError` 401 otherwise.

    Valid: ES256 only (no ``none``, no HMAC made with the public key), signed by the key its
    ``kid`` names (``key_for``), not expired (within :data:`LEEWAY`), from ``issuer``, for
    ``audience``, with the :data:`REQUIRED_CLAIMS` and well-formed scopes. Every verifier calls
    this; only ``key_for`` differs."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthError(401, f"the access token is not valid ({type(exc).__name__})") from exc
    if header.get("alg") != JWT_ALGORITHM:
        raise AuthError(401, f"the access token must be signed with {JWT_ALGORITHM}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError(401, "the access token does not name its signing key (kid)")
    key = key_for(kid)
    if key is None:
        raise AuthError(401, "the access token is signed with an unknown key")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[JWT_ALGORITHM],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError(401, "the access token has expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise AuthError(401, f"the access token is not meant for {audience}") from exc
    except jwt.PyJWTError as exc:
        raise AuthError(401, f"the access token is not valid ({type(exc).__name__})") from exc
    subject, scope, patient, token_id = (claims.get(n) for n in ("sub", "scope", "patient", "jti"))
    if not isinstance(subject, str) or not isinstance(scope, str):
        raise AuthError(401, "the access token's sub and scope must be strings")
    if patient is not None and (not isinstance(patient, str) or not patient):
        raise AuthError(401, "the access token's patient claim must be a Patient id")
    roles, fhir_user = claims.get("roles", []), claims.get("fhirUser")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError(401, "the access token's roles claim must be a list of strings")
    if fhir_user is not None and not isinstance(fhir_user, str):
        raise AuthError(401, "the access token's fhirUser claim must be a string")
    try:
        scopes = parse_scopes(scope)
    except ValueError as exc:
        raise AuthError(401, str(exc)) from exc
    return Grant(
        subject,
        scopes,
        patient,
        token_id if isinstance(token_id, str) else None,
        tuple(roles),
        fhir_user,
    )


@dataclass
class TokenService:
    """Issues tokens signed with the key set's newest key; verifies them with any of its keys."""

    keys: KeySet
    lifetime: timedelta = timedelta(minutes=15)
    clock: Callable[[], datetime] = field(default=_now)
    #: The ``aud`` :meth:`verify` expects (this service's own).
    audience: str = TOKEN_AUDIENCE

    def issue(
        self,
        client_id: str,
        scopes: Iterable[Scope],
        patient: str | None = None,
        lifetime: timedelta | None = None,
        audience: str | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> tuple[str, int]:
        """(token, seconds until it expires); for :attr:`audience` unless ``audience`` says.
        ``client_id`` is the ``sub`` (a staff member's account id for their tokens);
        ``claims`` adds others (a staff member's ``roles`` and ``fhirUser``), never one of
        the registered claims above."""
        now = self.clock()
        ttl = lifetime or self.lifetime
        payload: dict[str, Any] = {
            "iss": TOKEN_ISSUER,
            "aud": audience or self.audience,
            "sub": client_id,
            "iat": int(now.timestamp()),
            "exp": int((now + ttl).timestamp()),
            "jti": uuid.uuid4().hex,
            "scope": " ".join(str(s) for s in scopes),
        }
        if patient:
            payload["patient"] = patient
        for name, value in (claims or {}).items():
            payload.setdefault(name, value)
        signing = self.keys.signing
        token = jwt.encode(
            payload, signing.private_key, algorithm=JWT_ALGORITHM, headers={"kid": signing.kid}
        )
        return token, int(ttl.total_seconds())

    def verify(self, token: str) -> Grant:
        """The grant of a valid token for :attr:`audience`; :class:`AuthError` 401 otherwise."""
        return verify_token(token, self.keys.public_key, self.audience)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; :class:`AuthError` 401."""
    if not authorization:
        raise AuthError(401, "a bearer access token is required (Authorization: Bearer ...)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "the Authorization header must be 'Bearer <access token>'")
    return token.strip()
