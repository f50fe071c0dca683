"""What the authorization server remembers between requests: authorization codes and refresh
tokens, each only as the SHA-256 of its value (both are random 256-bit strings).

A code is single-use: the token request that redeems it marks it used in the same statement
that checks it was not (:func:`redeem_code`), so two concurrent requests cannot both redeem it;
presenting it again revokes what it produced (RFC 6749 §4.1.2). Refresh tokens rotate: each
use marks the token replaced (:func:`use_refresh_token`) and the response carries a new one of
the same *family*; presenting a replaced or revoked token again revokes the whole family
(OAuth 2.0 Security BCP, RFC 9700 §4.14.2), since either its holder or a thief is replaying it.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import DateTime, Text, delete, update
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col

from scanwatch.database import for_writes

log = logging.getLogger(__name__)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AuthorizationCode(SQLModel, table=True):
    """An authorization code issued to a client for a signed-in account."""

    __tablename__ = "oauth_authorization_code"

    code_sha256: str = Field(primary_key=True, max_length=64)
    client_id: str = Field(max_length=100)
    account_id: str = Field(max_length=32)
    redirect_uri: str = Field(sa_type=Text)
    scope: str = Field(sa_type=Text)
    code_challenge: str = Field(max_length=128)
    code_challenge_method: str = Field(max_length=16)
    nonce: str | None = Field(default=None, sa_type=Text)
    auth_time: int
    family: str = Field(max_length=32, description="the refresh-token family it starts")
    expires: datetime = Field(sa_type=DateTime(timezone=True))
    used: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))

    # Authlib's AuthorizationCodeMixin (and the OpenID Connect one).
    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> str | None:
        return None

    def get_amr(self) -> list[str] | None:
        return None


class RefreshToken(SQLModel, table=True):
    """A refresh token (offline_access) of one family: the tokens that replaced each other
    since one authorization code."""

    __tablename__ = "oauth_refresh_token"

    token_sha256: str = Field(primary_key=True, max_length=64)
    family: str = Field(max_length=32, index=True)
    client_id: str = Field(max_length=100)
    account_id: str = Field(max_length=32, index=True)
    scope: str = Field(sa_type=Text)
    issued: datetime = Field(sa_type=DateTime(timezone=True))
    expires: datetime = Field(sa_type=DateTime(timezone=True))
    replaced: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    revoked: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))

    # Authlib's TokenMixin.
    def check_client(self, client: object) -> bool:
        return getattr(client, "client_id", None) == self.client_id

    def get_scope(self) -> str:
        return self.scope


def save_code(engine: Engine, code: str, row: AuthorizationCode) -> None:
    """Store ``row`` under ``code``'s hash; codes that expired a day ago go."""
    row.code_sha256 = digest(code)
    with Session(for_writes(engine)) as session:
        session.execute(
            delete(AuthorizationCode).where(
                col(AuthorizationCode.expires) < row.expires - timedelta(days=1)
            )
        )
        session.add(row)
        session.commit()


def redeem_code(
    engine: Engine, code: str, client_id: str, now: datetime
) -> AuthorizationCode | None:
    """The code's record, marked used, when ``code`` was issued to ``client_id``, is unused and
    unexpired; None otherwise. A code presented again revokes the refresh tokens it produced."""
    key = digest(code)
    with Session(for_writes(engine)) as session:
        redeemed = session.execute(
            update(AuthorizationCode)
            .where(
                col(AuthorizationCode.code_sha256) == key,
                col(AuthorizationCode.client_id) == client_id,
                col(AuthorizationCode.used).is_(None),
                col(AuthorizationCode.expires) > now,
            )
            .values(used=now)
        )
        row = session.get(AuthorizationCode, key)
        if redeemed.rowcount != 1:  # type: ignore[attr-defined]
            if row is not None and row.used is not None:
                revoked = _revoke_family(session, row.family, now)
                log.warning(
                    "authorization code used twice: its tokens are revoked",
                    extra={"client_id": row.client_id, "family": row.family, "revoked": revoked},
                )
            session.commit()
            return None
        assert row is not None
        session.expunge(row)  # detached with its attributes loaded: usable after the commit
        session.commit()
        return row


def save_refresh_token(engine: Engine, token: str, row: RefreshToken) -> None:
    """Store ``row`` under ``token``'s hash; tokens that expired a day ago go (an expired
    token is refused whatever its state, so its row no longer guards anything)."""
    row.token_sha256 = digest(token)
    with Session(for_writes(engine)) as session:
        session.execute(
            delete(RefreshToken).where(col(RefreshToken.expires) < row.issued - timedelta(days=1))
        )
        session.add(row)
        session.commit()


def use_refresh_token(engine: Engine, token: str, now: datetime) -> RefreshToken | None:
    """The refresh token's record, now marked replaced, when it is current (not replaced,
    revoked or expired); None otherwise. A replaced or revoked token presented again revokes
    its whole family."""
    key = digest(token)
    with Session(for_writes(engine)) as session:
        used = session.execute(
            update(RefreshToken)
            .where(
                col(RefreshToken.token_sha256) == key,
                col(RefreshToken.replaced).is_(None),
                col(RefreshToken.revoked).is_(None),
                col(RefreshToken.expires) > now,
            )
            .values(replaced=now)
        )
        row = session.get(RefreshToken, key)
        if used.rowcount != 1:  # type: ignore[attr-defined]
            if row is not None and (row.replaced is not None or row.revoked is not None):
                revoked = _revoke_family(session, row.family, now)
                log.warning(
                    "refresh token reused: its family is revoked",
                    extra={"client_id": row.client_id, "family": row.family, "revoked": revoked},
                )
            session.commit()
            return None
        assert row is not None
        session.expunge(row)  # detached with its attributes loaded: usable after the commit
        session.commit()
        return row


def find_refresh_token(engine: Engine, token: str) -> RefreshToken | None:
    with Session(engine) as session:
        return session.get(RefreshToken, digest(token))


def revoke_family(engine: Engine, family: str, now: datetime) -> int:
    """Revoke every token of ``family`` (sign-out); how many were still usable."""
    with Session(for_writes(engine)) as session:
        count = _revoke_family(session, family, now)
        session.commit()
    log.info("refresh tokens revoked", extra={"family": family, "revoked": count})
    return count


def _revoke_family(session: Session, family: str, now: datetime) -> int:
    result = session.execute(
        update(RefreshToken)
        .where(col(RefreshToken.family) == family, col(RefreshToken.revoked).is_(None))
        .values(revoked=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def revoke_account_tokens(session: Session, account_id: str, now: datetime) -> int:
    """Revoke every refresh token of an account (its credentials changed), in ``session``."""
    result = session.execute(
        update(RefreshToken)
        .where(col(RefreshToken.account_id) == account_id, col(RefreshToken.revoked).is_(None))
        .values(revoked=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
