"""Accounts (users) and their API tokens, kept in the index database.

A password is kept as an argon2id hash (argon2-cffi, its default parameters: RFC 9106's second
recommended option); an API token as the SHA-256 of its secret only (the secret is 256 random
bits, so a fast hash is enough: nothing to guess from it), shown once when it is made. The role
names are the protocol layer's (``server.access``); this module keeps them as given.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select

from storage.errors import Conflict, InvalidQuery, NotFound
from storage.index.database import Index
from storage.index.models import Account, ApiToken, Partition
from storage.jobs import as_utc

ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
PARTITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Tokens start with this, so that secret scanners and people recognise one.
TOKEN_PREFIX = "hilum_"
MIN_PASSWORD_LENGTH = 8


@dataclass(frozen=True)
class AccountInfo:
    name: str
    role: str
    partitions: tuple[str, ...]  # empty: every partition
    disabled: bool
    has_password: bool
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    id: str
    account: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "valid"


@dataclass(frozen=True)
class TokenOwner:
    """Whom a valid API token speaks for."""

    token_id: str
    account: AccountInfo
    expires_at: datetime | None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@functools.cache
def _unknown_account_hash() -> str:
    """Verified against when the account does not exist, so that a failed login takes the same
    time whether or not the name is known."""
    return PasswordHasher().hash(secrets.token_hex(16))


def _now() -> datetime:
    return datetime.now(UTC)


def _info(row: Account) -> AccountInfo:
    return AccountInfo(
        name=row.name,
        role=row.role,
        partitions=tuple(row.partitions or ()),
        disabled=row.disabled,
        has_password=row.password_hash is not None,
        created_at=as_utc(row.created_at) or _now(),
    )


def _token(row: ApiToken) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        account=row.account_name,
        created_at=as_utc(row.created_at) or _now(),
        expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at),
    )


class Accounts:
    """Accounts and API tokens of one index database."""

    def __init__(self, index: Index, clock: Callable[[], datetime] = _now) -> None:
        self.index = index
        self.clock = clock
        self._hasher = PasswordHasher()

    # -- accounts -------------------------------------------------------------------------

    def add_account(
        self, name: str, role: str, partitions: Sequence[str] = (), password: str | None = None
    ) -> AccountInfo:
        if not ACCOUNT_NAME.match(name):
            raise InvalidQuery(
                f"{name[:80]!r} is not a valid user name (1-64 letters, digits, . _ @ -)"
            )
        for partition in partitions:
            if not PARTITION_NAME.match(partition):
                raise InvalidQuery(f"{partition[:80]!r} is not a valid partition name")
        if password is not None and len(password) < MIN_PASSWORD_LENGTH:
            raise InvalidQuery(f"the password must be at least {MIN_PASSWORD_LENGTH} characters")
        with self.index.write() as session:
            if session.get(Account, name) is not None:
                raise Conflict(f"user {name} exists already")
            for partition in partitions:
                if session.get(Partition, partition) is None:
                    raise NotFound(
                        f"no partition {partition}: create it first (hilum partitions create)"
                    )
            row = Account(
                name=name,
                role=role,
                partitions=sorted(set(partitions)),
                password_hash=self._hasher.hash(password) if password is not None else None,
                disabled=False,
                created_at=self.clock(),
            )
            session.add(row)
            session.flush()
            return _info(row)

    def accounts(self) -> list[AccountInfo]:
        with self.index.read() as session:
            return [_info(row) for row in session.scalars(select(Account).order_by(Account.name))]

    def account(self, name: str) -> AccountInfo | None:
        with self.index.read() as session:
            row = session.get(Account, name)
            return _info(row) if row is not None else None

    def disable_account(self, name: str) -> AccountInfo:
        """Disables the account: its logins and every one of its tokens are refused."""
        with self.index.write() as session:
            row = session.get(Account, name)
            if row is None:
                raise NotFound(f"no user {name[:80]}")
            row.disabled = True
            return _info(row)

    def check_password(self, name: str, password: str) -> AccountInfo | None:
        """The enabled account ``name`` if ``password`` is its password, else None; the same
        work (one argon2 verification) whether or not the account exists."""
        with self.index.read() as session:
            row = session.get(Account, name) if ACCOUNT_NAME.match(name) else None
            stored = row.password_hash if row is not None else None
            info = _info(row) if row is not None else None
        try:
            self._hasher.verify(stored or _unknown_account_hash(), password)
        except (VerificationError, InvalidHashError):
            return None
        if info is None or stored is None or info.disabled:
            return None
        return info

    # -- API tokens -----------------------------------------------------------------------

    def create_token(
        self, account: str, expires_days: float | None = None
    ) -> tuple[TokenInfo, str]:
        """A new token of ``account``: its record and its secret (shown once, kept nowhere)."""
        if expires_days is not None and expires_days <= 0:
            raise InvalidQuery("--expires-days must be more than 0")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        with self.index.write() as session:
            owner = session.get(Account, account)
            if owner is None:
                raise NotFound(f"no user {account[:80]}")
            if owner.disabled:
                raise Conflict(f"user {account} is disabled")
            row = ApiToken(
                id=secrets.token_hex(6),
                account_name=account,
                secret_sha256=token_digest(secret),
                created_at=now,
                expires_at=now + timedelta(days=expires_days) if expires_days else None,
                revoked_at=None,
            )
            session.add(row)
            session.flush()
            return _token(row), secret

    def tokens(self) -> list[TokenInfo]:
        with self.index.read() as session:
            rows = session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id))
            return [_token(row) for row in rows]

    def revoke_token(self, token_id: str) -> TokenInfo:
        with self.index.write() as session:
            row = session.get(ApiToken, token_id)
            if row is None:
                raise NotFound(f"no API token {token_id[:40]}")
            if row.revoked_at is None:
                row.revoked_at = self.clock()
            return _token(row)

    def token_owner(self, token: str) -> TokenOwner | None:
        """Whom ``token`` speaks for, if it is a token of an enabled account, not revoked and
        not expired; else None."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self.index.read() as session:
            found = session.execute(
                select(ApiToken, Account)
                .join(Account, Account.name == ApiToken.account_name)
                .where(ApiToken.secret_sha256 == token_digest(token))
            ).first()
        if found is None:
            return None
        row, account = found
        info = _token(row)
        if info.state(self.clock()) != "valid" or account.disabled:
            return None
        return TokenOwner(info.id, _info(account), info.expires_at)
