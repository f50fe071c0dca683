"""Accounts that sign in at the authorization server, and the invitations that create them.

A patient account is linked to one Patient by its logical id
(:func:`scanwatch.ids.patient_id`), never by a name or a birth date: staff invite a patient
by PatientID (:func:`invite_patient` prints a one-time link), the patient opens it and chooses
a username and password (:func:`activate`), optionally TOTP.

A staff account (``kind`` staff) has a username given when it is created and one role
(:data:`STAFF_ROLES`, in ``roles``): :func:`create_staff` reserves the username and returns a
one-time activation link, whose page sets the password and TOTP, which staff must use (they
see every patient's records). The account signs in only once activated.

Secrets: invitation tokens are random 256-bit values stored as their SHA-256 (like client
secrets); passwords are argon2id hashes (:mod:`services.auth.passwords`). Repeated failed
sign-ins lock an account for a while (:func:`sign_in`); the answer to a refused sign-in never
says whether the username exists.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pyotp
from sqlalchemy import DateTime, Text, delete, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from scanwatch.database import for_writes
from services.auth import passwords, store
from services.auth.scopes import STAFF_ROLES as STAFF_ROLES  # the roles a staff account holds

log = logging.getLogger(__name__)

PATIENT = "patient"
STAFF = "staff"
#: The password hash of a staff account not yet activated (matches no password).
UNUSABLE_PASSWORD = "!"
USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{2,63}$")
#: Where the activation page is served (relative to the server's root).
ACTIVATE_PATH = "/auth/activate"
#: The issuer name shown in authenticator apps.
TOTP_ISSUER = "scanwatch"


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (SQLite returns stored datetimes naive)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Account(SQLModel, table=True):
    """Someone who signs in: a patient (linked to a Patient id) or, later, a staff member."""

    __tablename__ = "account"

    account_id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(max_length=16, description="patient or staff")
    username: str = Field(max_length=64, unique=True, description="lower case")
    password_hash: str = Field(max_length=200, description="argon2id, encoded")
    patient: str | None = Field(
        default=None, max_length=64, unique=True, description="the Patient's logical id"
    )
    roles: str | None = Field(default=None, sa_type=Text, description="staff: space-separated")
    totp_secret: str | None = Field(default=None, max_length=64)
    totp_last_step: int | None = Field(default=None, description="last TOTP step accepted")
    failed_signins: int = 0
    locked_until: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    created: datetime = Field(sa_type=DateTime(timezone=True))
    password_changed: datetime = Field(sa_type=DateTime(timezone=True))
    last_signin: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    active: bool = True


class AccountInvite(SQLModel, table=True):
    """A one-time activation link for a patient, or for a staff account created beforehand
    (only the token's SHA-256 is kept)."""

    __tablename__ = "account_invite"

    token_sha256: str = Field(primary_key=True, max_length=64)
    patient: str | None = Field(default=None, max_length=64, index=True)
    account_id: str | None = Field(default=None, max_length=32, description="a staff account")
    created: datetime = Field(sa_type=DateTime(timezone=True))
    expires: datetime = Field(sa_type=DateTime(timezone=True))
    used: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


@dataclass(frozen=True)
class User:
    """The signed-in account, as the grants see it."""

    account_id: str
    patient: str | None
    kind: str = PATIENT
    roles: tuple[str, ...] = ()

    def get_user_id(self) -> str:  # Authlib's user interface
        return self.account_id

    @property
    def staff(self) -> bool:
        return self.kind == STAFF

    @property
    def practitioner(self) -> str | None:
        """A clinician's Practitioner logical id (the account id: stable, no PHI), else None."""
        return self.account_id if self.staff and "clinician" in self.roles else None

    @classmethod
    def of(cls, account: Account) -> User:
        roles = tuple((account.roles or "").split()) if account.kind == STAFF else ()
        return cls(account.account_id, account.patient, account.kind, roles)


class InviteInvalid(ValueError):
    """The activation link is unknown, expired or used."""


class UsernameRefused(ValueError):
    """The username is malformed or taken; the message says which, for the person."""


def invite_patient(
    engine: Engine,
    patient: str,
    lifetime: timedelta = timedelta(hours=72),
    now: datetime | None = None,
) -> str:
    """A new one-time activation token for the Patient with logical id ``patient`` (only its
    hash is stored); :func:`activation_link` makes the link to hand to the patient."""
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", patient):
        raise ValueError("patient must be a FHIR logical id")
    moment = utc(now or datetime.now(UTC))
    token = secrets.token_urlsafe(32)
    with Session(for_writes(engine)) as session:
        # Invitations a month past their expiry are of no use, not even to say "expired".
        session.execute(
            delete(AccountInvite).where(col(AccountInvite.expires) < moment - timedelta(days=30))
        )
        session.add(
            AccountInvite(
                token_sha256=digest(token),
                patient=patient,
                created=moment,
                expires=moment + lifetime,
            )
        )
        session.commit()
    log.info(
        "patient invited", extra={"patient": patient, "expires_in_s": int(lifetime.total_seconds())}
    )
    return token


def activation_link(base_url: str, token: str) -> str:
    """The activation page's URL for ``token`` on the server at ``base_url``."""
    return f"{base_url.rstrip('/')}{ACTIVATE_PATH}?{urlencode({'token': token})}"


def invite_link(
    engine: Engine,
    patient: str,
    base_url: str,
    lifetime: timedelta = timedelta(hours=72),
) -> str:
    """:func:`invite_patient` and its :func:`activation_link`: what a CLI prints."""
    return activation_link(base_url, invite_patient(engine, patient, lifetime))


def pending_invite(engine: Engine, token: str, now: datetime) -> AccountInvite:
    """The invitation ``token`` opens, while it is unused and unexpired; :class:`InviteInvalid`."""
    with Session(engine) as session:
        invite = session.get(AccountInvite, digest(token))
    if invite is None or invite.used is not None or utc(invite.expires) <= utc(now):
        raise InviteInvalid("This activation link has expired or has been used already.")
    return invite


def check_username(username: str) -> str:
    """The normalised (lower-case) username; :class:`UsernameRefused` when malformed."""
    normalised = username.strip().lower()
    if not USERNAME_RE.match(normalised):
        raise UsernameRefused(
            "Choose a username of 3 to 64 characters: letters, digits, '.', '_', '-' or '@', "
            "starting with a letter or digit."
        )
    return normalised


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, username: str) -> str:
    """The ``otpauth://`` URI authenticator apps read (also as a QR code)."""
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER)


def totp_step(secret: str, code: str, now: datetime, after: int | None = None) -> int | None:
    """The time step ``code`` is valid for (this one or the one either side of it), or None;
    a step not later than ``after`` (already used) is refused: a code works once."""
    code = code.strip().replace(" ", "")
    if not re.fullmatch(r"[0-9]{6}", code):  # not \d: it matches other scripts' digits
        return None
    totp = pyotp.TOTP(secret)
    step = totp.timecode(utc(now))
    for candidate in (step, step - 1, step + 1):
        if (after is None or candidate > after) and secrets.compare_digest(
            totp.generate_otp(candidate), code
        ):
            return candidate
    return None


def activate(
    engine: Engine,
    token: str,
    username: str,
    password: str,
    now: datetime,
    totp_secret: str | None = None,
    totp_code: str | None = None,
) -> Account:
    """Use the invitation ``token`` (once) to give its patient an account with ``username``
    and ``password`` (and TOTP when ``totp_secret`` is given with a valid ``totp_code``).

    An account the patient already has gets the new credentials (this is how staff reset a
    forgotten password: a new invitation); its refresh tokens are revoked.
    :class:`InviteInvalid`, :class:`UsernameRefused`, :class:`passwords.PasswordRefused` or
    ValueError (the TOTP code) say what to fix."""
    moment = utc(now)
    invite = pending_invite(engine, token, moment)  # cheap refusal before the slow hash
    staff_username = invite_username(engine, invite)
    name = staff_username or check_username(username)
    passwords.check_policy(password, name)
    step: int | None = None
    if staff_username and not totp_secret:
        raise ValueError(
            "Staff accounts need an authenticator app: add the key below to one and type the "
            "code it shows."
        )
    if totp_secret:
        step = totp_step(totp_secret, totp_code or "", moment)
        if step is None:
            raise ValueError(
                "That code from your authenticator app is not right. Check the app shows "
                "scanwatch and try the newest code."
            )
    encoded = passwords.hash_password(password)
    try:
        with Session(for_writes(engine)) as session:
            used = session.execute(
                update(AccountInvite)
                .where(
                    col(AccountInvite.token_sha256) == digest(token),
                    col(AccountInvite.used).is_(None),
                    col(AccountInvite.expires) > moment,
                )
                .values(used=moment)
            )
            if used.rowcount != 1:  # type: ignore[attr-defined]
                raise InviteInvalid("This activation link has expired or has been used already.")
            used_invite = session.get(AccountInvite, digest(token))
            assert used_invite is not None
            invite = used_invite
            found = (
                session.get(Account, invite.account_id)
                if invite.account_id
                else session.exec(
                    select(Account).where(col(Account.patient) == invite.patient)
                ).first()
            )
            if invite.account_id and found is None:
                raise InviteInvalid("This activation link has expired or has been used already.")
            account = found or Account(
                account_id=uuid.uuid4().hex,
                kind=PATIENT,
                username=name,
                password_hash="",
                patient=invite.patient,
                created=moment,
                password_changed=moment,
            )
            account.username = name
            account.password_hash = encoded
            account.password_changed = moment
            account.totp_secret = totp_secret or None
            account.totp_last_step = step
            account.failed_signins = 0
            account.locked_until = None
            account.active = True
            session.add(account)
            session.flush()
            store.revoke_account_tokens(session, account.account_id, moment)
            session.commit()
            session.refresh(account)
    except IntegrityError as exc:
        raise UsernameRefused("This username is taken. Choose another.") from exc
    log.info(
        "account activated",
        extra={"account_id": account.account_id, "totp": bool(totp_secret)},
    )
    return account


@dataclass(frozen=True)
class SignInPolicy:
    """How many failures in a row lock an account, and for how long."""

    max_failures: int = 5
    lockout: timedelta = timedelta(minutes=15)


def sign_in(
    engine: Engine,
    username: str,
    password: str,
    totp_code: str,
    now: datetime,
    policy: SignInPolicy = SignInPolicy(),
) -> User | None:
    """The account's :class:`User` when ``username``, ``password`` (and the TOTP code, when
    the account has TOTP) are right and the account is not locked; None otherwise, whichever
    the reason, after the same password-hashing work (the caller's answer must not tell an
    unknown username from a wrong password or a locked account).

    A failure counts against the account; :attr:`SignInPolicy.max_failures` in a row lock it
    for :attr:`SignInPolicy.lockout`; a success clears the count. The slow hash runs outside
    any transaction (sign-ins do not queue behind one another's hashing for the SQLite write
    lock); the counts, the lock and the TOTP step then change in one short write each, by
    statements that read the row they change, so concurrent attempts are all counted and a
    TOTP code is accepted once."""
    moment = utc(now)
    name = username.strip().lower()
    with Session(engine) as session:
        account = session.exec(select(Account).where(col(Account.username) == name)).first()
    if account is None or not account.active:
        passwords.verify_password(None, password)
        log.info("sign-in refused", extra={"reason": "unknown"})
        return None
    if _locked(account, moment):
        passwords.verify_password(None, password)
        log.info("sign-in refused", extra={"reason": "locked", "account_id": account.account_id})
        return None
    reason: str | None = None
    step: int | None = None
    if not passwords.verify_password(account.password_hash, password):
        reason = "password"
    elif account.totp_secret:
        step = totp_step(account.totp_secret, totp_code, moment, account.totp_last_step)
        if step is None:
            reason = "totp"
    rehashed = (
        passwords.hash_password(password)
        if reason is None and passwords.needs_rehash(account.password_hash)
        else None
    )
    with Session(for_writes(engine)) as session:
        if reason is None:
            reason = _accept(session, account, moment, step, rehashed)
        if reason is not None:
            locked = _count_failure(session, account.account_id, moment, policy)
            session.commit()
            log.info(
                "sign-in refused",
                extra={"reason": reason, "account_id": account.account_id, "locked": locked},
            )
            return None
        session.commit()
    log.info("signed in", extra={"account_id": account.account_id})
    return User.of(account)


def _locked(account: Account, moment: datetime) -> bool:
    return account.locked_until is not None and utc(account.locked_until) > moment


def _accept(
    session: Session, account: Account, moment: datetime, step: int | None, rehashed: str | None
) -> str | None:
    """Record a good sign-in, unless the account was locked (or its TOTP step used) meanwhile:
    then the reason it is refused."""
    changes: dict[str, object] = {"failed_signins": 0, "locked_until": None, "last_signin": moment}
    if rehashed is not None:
        changes["password_hash"] = rehashed
    conditions = [
        col(Account.account_id) == account.account_id,
        col(Account.password_hash) == account.password_hash,  # not changed meanwhile
        (col(Account.locked_until).is_(None)) | (col(Account.locked_until) <= moment),
    ]
    if step is not None:
        changes["totp_last_step"] = step
        conditions.append(
            (col(Account.totp_last_step).is_(None)) | (col(Account.totp_last_step) < step)
        )
    done = session.execute(update(Account).where(*conditions).values(**changes))
    return None if done.rowcount == 1 else "raced"  # type: ignore[attr-defined]


def _count_failure(
    session: Session, account_id: str, moment: datetime, policy: SignInPolicy
) -> bool:
    """Count a failure (in the database, so that concurrent ones all count); lock the account
    when it reaches the limit. Whether it is now locked."""
    session.execute(
        update(Account)
        .where(col(Account.account_id) == account_id)
        .values(failed_signins=col(Account.failed_signins) + 1)
    )
    locked = session.execute(
        update(Account)
        .where(
            col(Account.account_id) == account_id,
            col(Account.failed_signins) >= policy.max_failures,
        )
        .values(failed_signins=0, locked_until=moment + policy.lockout)
    )
    return bool(locked.rowcount)  # type: ignore[attr-defined]


def load_user(engine: Engine, account_id: str) -> User | None:
    """The active account ``account_id`` as a :class:`User`, or None."""
    with Session(engine) as session:
        account = session.get(Account, account_id)
    if account is None or not account.active:
        return None
    return User.of(account)


#: A clock: the current time, aware (tests inject their own).
Clock = Callable[[], datetime]


# --- staff accounts ---------------------------------------------------------------------------


def invite_username(engine: Engine, invite: AccountInvite) -> str | None:
    """The username of the staff account ``invite`` activates (fixed when it was created);
    None for a patient's invitation (the patient chooses one)."""
    if invite.account_id is None:
        return None
    with Session(engine) as session:
        account = session.get(Account, invite.account_id)
    return account.username if account is not None else None


def _check_role(role: str) -> str:
    if role not in STAFF_ROLES:
        raise ValueError(f"role must be one of {', '.join(STAFF_ROLES)}, not {role!r}")
    return role


def create_staff(
    engine: Engine,
    username: str,
    role: str,
    lifetime: timedelta = timedelta(hours=72),
    now: datetime | None = None,
) -> str:
    """Reserve ``username`` for a new staff account with ``role`` (not active: it signs in
    once its activation link has been used) and return the one-time activation token
    (:func:`activation_link` makes the link). :class:`UsernameRefused` when the name is
    malformed or taken; ValueError for an unknown role."""
    name = check_username(username)
    _check_role(role)
    moment = utc(now or datetime.now(UTC))
    token = secrets.token_urlsafe(32)
    account_id = uuid.uuid4().hex
    try:
        with Session(for_writes(engine)) as session:
            session.add(
                Account(
                    account_id=account_id,
                    kind=STAFF,
                    username=name,
                    password_hash=UNUSABLE_PASSWORD,
                    roles=role,
                    created=moment,
                    password_changed=moment,
                    active=False,
                )
            )
            session.flush()
            session.add(
                AccountInvite(
                    token_sha256=digest(token),
                    account_id=account_id,
                    created=moment,
                    expires=moment + lifetime,
                )
            )
            session.commit()
    except IntegrityError as exc:
        raise UsernameRefused(f"The username {name} is taken.") from exc
    log.info("staff account created", extra={"account_id": account_id, "role": role})
    return token


def staff_invite_link(
    engine: Engine,
    username: str,
    role: str,
    base_url: str,
    lifetime: timedelta = timedelta(hours=72),
) -> str:
    """:func:`create_staff` and its :func:`activation_link`: what ``scanwatch staff create``
    prints."""
    return activation_link(base_url, create_staff(engine, username, role, lifetime))


def ensure_staff_account(
    engine: Engine, username: str, role: str, password: str, now: datetime | None = None
) -> User:
    """A staff account with this password and role, active, without TOTP: created, or reset
    when it exists. For the development stack's login only (its caller refuses to run off
    development); real staff accounts come from :func:`create_staff`."""
    name = check_username(username)
    _check_role(role)
    passwords.check_policy(password, name)
    moment = utc(now or datetime.now(UTC))
    encoded = passwords.hash_password(password)
    with Session(for_writes(engine)) as session:
        account = session.exec(select(Account).where(col(Account.username) == name)).first()
        if account is not None and account.kind != STAFF:
            raise UsernameRefused(f"The username {name} belongs to a patient.")
        account = account or Account(
            account_id=uuid.uuid4().hex,
            kind=STAFF,
            username=name,
            password_hash="",
            created=moment,
            password_changed=moment,
        )
        account.password_hash = encoded
        account.password_changed = moment
        account.roles = role
        account.totp_secret = None
        account.totp_last_step = None
        account.failed_signins = 0
        account.locked_until = None
        account.active = True
        session.add(account)
        session.commit()
        session.refresh(account)
    return User.of(account)
