"""Store functions for accounts and their enrollment codes.

An administrator creates an account together with a one-time enrollment code (stored only as an
Argon2id PHC hash). The code is *pending* while it is neither used nor burned; an account has at
most one code at a time (the code table is keyed by account), so issuing a new code replaces the
old one. Enrollment marks the code used and records the identity key, the user certificate, the
first device and its prekeys in one transaction: either all of it exists afterwards or none.

Verifying a code (Argon2) happens outside SQL; these functions only read and update state, and the
checks that matter under concurrency (code still pending and unexpired) are repeated inside the
UPDATE that consumes the code.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.storage.devices import DeviceRow, add_device_txn
from medrelay.server.storage.errors import AccountExists, DeviceExists, EnrollmentConflict
from medrelay.server.storage.schema import accounts, devices, enrollment_codes
from medrelay.server.storage.sql import insert_for


@dataclass(frozen=True)
class AccountRow:
    pk: int
    username: str
    role: str
    display_name: str
    specialty: str | None
    department: str | None
    status: str
    """"active" or "revoked"."""
    created_ms: int
    identity_key: bytes | None
    """The user's Ed25519 identity key (encoded), set at enrollment."""
    user_certificate: bytes | None
    """The clinic-signed user certificate, set at enrollment."""

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def enrolled(self) -> bool:
        return self.user_certificate is not None


@dataclass(frozen=True)
class EnrollmentRow:
    """A pending enrollment code. The caller verifies the code against `code_hash` and must also
    check `expires_ms` against its clock (`complete_enrollment_txn` re-checks both)."""

    account_id: int
    username: str
    role: str
    code_hash: str
    created_ms: int
    expires_ms: int
    failed_attempts: int


def create_account_txn(
    conn: Connection,
    *,
    username: str,
    role: str,
    display_name: str,
    specialty: str | None,
    department: str | None,
    code_hash: str,
    now_ms: int,
    code_expires_ms: int,
) -> int:
    """Create an active account with a pending enrollment code; returns the account id.

    Raises `AccountExists` if the username is taken (nothing is written then)."""
    account_id = conn.execute(
        insert_for(conn, accounts)
        .values(
            username=username,
            role=role,
            display_name=display_name,
            specialty=specialty,
            department=department,
            status="active",
            created_at=now_ms,
        )
        .on_conflict_do_nothing(index_elements=[accounts.c.username])
        .returning(accounts.c.pk)
    ).scalar_one_or_none()
    if account_id is None:
        raise AccountExists("an account with this username already exists")
    replace_enrollment_code_txn(
        conn, account_id, code_hash=code_hash, now_ms=now_ms, expires_ms=code_expires_ms
    )
    return int(account_id)


def get_account_txn(conn: Connection, username: str) -> AccountRow | None:
    """The account named `username` (active or revoked), or None."""
    row = conn.execute(sa.select(accounts).where(accounts.c.username == username)).first()
    if row is None:
        return None
    return AccountRow(
        pk=row.pk,
        username=row.username,
        role=row.role,
        display_name=row.display_name,
        specialty=row.specialty,
        department=row.department,
        status=row.status,
        created_ms=row.created_at,
        identity_key=bytes(row.identity_key) if row.identity_key is not None else None,
        user_certificate=bytes(row.user_certificate) if row.user_certificate is not None else None,
    )


def account_roles_txn(conn: Connection, usernames: Collection[str]) -> dict[str, str]:
    """username -> role of each named *active* account (unknown and revoked ones are absent):
    what a send's policy check needs for its recipients, in the send's own transaction."""
    if not usernames:
        return {}
    rows = conn.execute(
        sa.select(accounts.c.username, accounts.c.role).where(
            accounts.c.username.in_(sorted(set(usernames))), accounts.c.status == "active"
        )
    ).all()
    return {username: role for username, role in rows}


def get_pending_enrollment_txn(conn: Connection, username: str) -> EnrollmentRow | None:
    """The pending (unused, unburned) code of an active account, or None. An expired code is
    still returned: compare `expires_ms` with the clock."""
    row = conn.execute(
        sa.select(
            accounts.c.pk,
            accounts.c.username,
            accounts.c.role,
            enrollment_codes.c.code_hash,
            enrollment_codes.c.created_at,
            enrollment_codes.c.expires_at,
            enrollment_codes.c.failed_attempts,
        )
        .select_from(accounts.join(enrollment_codes))
        .where(
            accounts.c.username == username,
            accounts.c.status == "active",
            enrollment_codes.c.used_at.is_(None),
            enrollment_codes.c.burned.is_(False),
        )
    ).first()
    if row is None:
        return None
    return EnrollmentRow(
        account_id=row.pk,
        username=row.username,
        role=row.role,
        code_hash=row.code_hash,
        created_ms=row.created_at,
        expires_ms=row.expires_at,
        failed_attempts=row.failed_attempts,
    )


def record_enrollment_failure_txn(conn: Connection, account_id: int, *, max_attempts: int) -> int:
    """Count a wrong code against the account's pending code; at `max_attempts` the code is
    burned (never usable again). Returns the failed attempts so far (0 without any code)."""
    attempts = conn.execute(
        sa.update(enrollment_codes)
        .where(
            enrollment_codes.c.account_pk == account_id,
            enrollment_codes.c.used_at.is_(None),
            enrollment_codes.c.burned.is_(False),
        )
        .values(
            failed_attempts=enrollment_codes.c.failed_attempts + 1,
            burned=enrollment_codes.c.failed_attempts + 1 >= max_attempts,
        )
        .returning(enrollment_codes.c.failed_attempts)
    ).scalar_one_or_none()
    if attempts is None:  # no pending code: report what is there, change nothing
        attempts = conn.execute(
            sa.select(enrollment_codes.c.failed_attempts).where(
                enrollment_codes.c.account_pk == account_id
            )
        ).scalar_one_or_none()
    return int(attempts or 0)


def replace_enrollment_code_txn(
    conn: Connection, account_id: int, *, code_hash: str, now_ms: int, expires_ms: int
) -> None:
    """Give the account a new pending code, replacing (and so invalidating) any previous one."""
    values = {
        "code_hash": code_hash,
        "created_at": now_ms,
        "expires_at": expires_ms,
        "failed_attempts": 0,
        "used_at": None,
        "burned": False,
    }
    conn.execute(
        insert_for(conn, enrollment_codes)
        .values(account_pk=account_id, **values)
        .on_conflict_do_update(index_elements=[enrollment_codes.c.account_pk], set_=values)
    )


def complete_enrollment_txn(
    conn: Connection,
    *,
    account_id: int,
    identity_key: bytes,
    user_certificate: bytes,
    device_id: str,
    device_certificate: bytes,
    signing_key: bytes,
    signed_prekey: bytes,
    one_time_prekeys: Sequence[bytes],
    now_ms: int,
) -> DeviceRow:
    """Consume the pending code and record the enrollment: the account's identity key and user
    certificate, the device, its signed prekey and one-time prekeys.

    Raises `EnrollmentConflict` when the code is no longer pending and unexpired at `now_ms` (used
    by a concurrent enrollment, burned, replaced, or the account revoked) and `DeviceExists` when
    the account already has this device id. Both are checked before anything is written; run in
    one transaction (as `run_interaction` does), nothing is ever half-created.
    """
    status = conn.execute(
        sa.select(accounts.c.status).where(accounts.c.pk == account_id)
    ).scalar_one_or_none()
    if status != "active":
        raise EnrollmentConflict("the account is not active")
    taken = conn.execute(
        sa.select(devices.c.pk).where(
            devices.c.account_pk == account_id, devices.c.device_id == device_id
        )
    ).first()
    if taken is not None:
        raise DeviceExists("the account already has a device with this id")
    # The consuming UPDATE re-checks every condition: of two concurrent enrollments with the same
    # code, exactly one matches a row (PostgreSQL re-evaluates the WHERE after the row lock).
    consumed = conn.execute(
        sa.update(enrollment_codes)
        .where(
            enrollment_codes.c.account_pk == account_id,
            enrollment_codes.c.used_at.is_(None),
            enrollment_codes.c.burned.is_(False),
            enrollment_codes.c.expires_at > now_ms,
        )
        .values(used_at=now_ms)
    ).rowcount
    if consumed != 1:
        raise EnrollmentConflict("the enrollment code is used, expired or burned")
    conn.execute(
        sa.update(accounts)
        .where(accounts.c.pk == account_id)
        .values(identity_key=identity_key, user_certificate=user_certificate)
    )
    return add_device_txn(
        conn,
        account_id=account_id,
        device_id=device_id,
        certificate=device_certificate,
        signing_key=signing_key,
        signed_prekey=signed_prekey,
        one_time_prekeys=one_time_prekeys,
        now_ms=now_ms,
    )
