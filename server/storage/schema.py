"""The relational schema of the relay: one SQLAlchemy Core `MetaData` and its tables.

This module is the *target* that Alembic migrations must reach (`migrations/versions/`); a test
checks that a database migrated to head has exactly these tables, columns and indexes on SQLite and
PostgreSQL. Change it only together with a new migration.

Conventions:
- times are integer milliseconds since the Unix epoch (`*_at`), passed in by callers;
- byte strings (keys, certificates, ciphertext, digests) are `LargeBinary`;
- integer surrogate keys are called `pk`; `seq` (queue order) and `pk` columns that can grow large
  are BIGINT on PostgreSQL and the rowid alias INTEGER on SQLite;
- every constraint and index has a deterministic name (the naming convention), so later
  migrations can refer to them on both databases.

Design notes (why the tables look like this):
- `enrollment_codes` has at most one row per account (its primary key is the account), so "at most
  one pending code per account" holds by construction; replacing a code overwrites the row.
- `devices.queued_count` is maintained by every function that inserts or deletes queue rows, so the
  queue cap check is one locked row read, not a COUNT over the queue.
- `queue_items.seq` comes from one global sequence (AUTOINCREMENT on SQLite, so a seq is never
  reused after the highest row is deleted). Every insert into a device's queue first locks that
  device's row, so per device, seq order equals commit order also on PostgreSQL with concurrent
  writers.
- `queue_items` copies the peer's user and device id (text) instead of joining at fetch time: a
  fetch is one index range scan, and an "expired" notice stays readable whatever happens to the
  peer afterwards.
- `messages` remembers (sender device, message id) -> digest for idempotent sends; it has no
  foreign key from `queue_items` so both can be pruned independently in bounded batches.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa

from medrelay.crypto.certificates import Role

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata: Final = sa.MetaData(naming_convention=NAMING_CONVENTION)

ROLES: Final = tuple(role.value for role in Role)
ACCOUNT_STATUSES: Final = ("active", "revoked")
QUEUE_KINDS: Final = ("msg", "expired", "notice")
ABSENCE_REASONS: Final = ("vacation", "sick", "other")
CONSENT_MODES: Final = ("notice", "explicit")

# A growing integer key: BIGINT on PostgreSQL; on SQLite it must be spelled INTEGER to become the
# rowid alias (and to allow AUTOINCREMENT).
BigKey: Final = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Millis: Final = sa.BigInteger


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


accounts: Final = sa.Table(
    "accounts",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("specialty", sa.String(200), nullable=True),
    sa.Column("department", sa.String(200), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    # Set when the first device enrolls (the user's Ed25519 identity key and the clinic-signed
    # user certificate over it); NULL before.
    sa.Column("identity_key", sa.LargeBinary, nullable=True),
    sa.Column("user_certificate", sa.LargeBinary, nullable=True),
    sa.UniqueConstraint("username"),
    sa.CheckConstraint(_in("role", ROLES), name="role"),
    sa.CheckConstraint(_in("status", ACCOUNT_STATUSES), name="status"),
)

enrollment_codes: Final = sa.Table(
    "enrollment_codes",
    metadata,
    sa.Column(
        "account_pk",
        sa.Integer,
        sa.ForeignKey("accounts.pk"),
        primary_key=True,
        autoincrement=False,
    ),
    # Argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    sa.Column("code_hash", sa.String(200), nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    sa.Column("failed_attempts", sa.Integer, nullable=False),
    sa.Column("used_at", Millis, nullable=True),
    # Too many wrong attempts: the code can never be used again (a new one must be issued).
    sa.Column("burned", sa.Boolean(create_constraint=False), nullable=False),
)

devices: Final = sa.Table(
    "devices",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("account_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("certificate", sa.LargeBinary, nullable=False),
    # Raw 32-byte Ed25519 public key that signs `auth` transcripts (also inside the certificate;
    # kept apart so a login does not parse the certificate).
    sa.Column("signing_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("revoked_at", Millis, nullable=True),
    sa.Column("queued_count", sa.Integer, nullable=False),
    sa.UniqueConstraint("account_pk", "device_id"),
)

sessions: Final = sa.Table(
    "sessions",
    metadata,
    # SHA-256 of the 32-byte session token: a stolen database does not hold usable tokens.
    sa.Column("token_hash", sa.LargeBinary, primary_key=True),
    sa.Column("device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    sa.Index(None, "device_pk"),
    sa.Index(None, "expires_at"),
)

signed_prekeys: Final = sa.Table(
    "signed_prekeys",
    metadata,
    sa.Column(
        "device_pk",
        sa.Integer,
        sa.ForeignKey("devices.pk"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("prekey", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
)

one_time_prekeys: Final = sa.Table(
    "one_time_prekeys",
    metadata,
    sa.Column("pk", BigKey, primary_key=True, autoincrement=True),
    sa.Column("device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("prekey", sa.LargeBinary, nullable=False),
    # Served oldest first: (device_pk, pk) finds the next one and counts the rest.
    sa.Index(None, "device_pk", "pk"),
)

messages: Final = sa.Table(
    "messages",
    metadata,
    sa.Column("pk", BigKey, primary_key=True, autoincrement=True),
    sa.Column("sender_device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("message_id", sa.LargeBinary, nullable=False),
    # The relay's digest of the whole send (all envelopes): a resend with the same id must match.
    sa.Column("digest", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.UniqueConstraint("sender_device_pk", "message_id"),
    sa.Index(None, "created_at"),
    # A batch of sends is checked for known ids with one probe per id (migration 0002).
    sa.Index(None, "message_id"),
)

queue_items: Final = sa.Table(
    "queue_items",
    metadata,
    sa.Column("seq", BigKey, primary_key=True, autoincrement=True),
    sa.Column("device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),
    # "msg": the sending user and device; "expired": the user and device that missed the message.
    sa.Column("peer_user", sa.String(64), nullable=False),
    sa.Column("peer_device", sa.String(64), nullable=False),
    sa.Column("message_id", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    # For "msg" rows, so expiry can notify the sending device; NULL for "expired" rows.
    sa.Column("sender_device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=True),
    sa.Column("size", sa.Integer, nullable=False),
    # "msg": the ciphertext; "notice": the clinic-signed notice; "expired": NULL.
    sa.Column("ciphertext", sa.LargeBinary, nullable=True),
    # "msg": ItemFlag bits (urgent 1, after hours 2, held 4) the relay knows; else 0.
    sa.Column("flags", sa.Integer, nullable=False, server_default="0"),
    sa.CheckConstraint(_in("kind", QUEUE_KINDS), name="kind"),
    sa.CheckConstraint(
        "(kind = 'msg' AND ciphertext IS NOT NULL AND sender_device_pk IS NOT NULL)"
        " OR (kind = 'expired' AND ciphertext IS NULL AND sender_device_pk IS NULL)"
        " OR (kind = 'notice' AND ciphertext IS NOT NULL AND sender_device_pk IS NULL)",
        name="kind_fields",
    ),
    sa.Index(None, "device_pk", "seq"),
    sa.Index(None, "expires_at"),
    sqlite_autoincrement=True,
)

blobs: Final = sa.Table(
    "blobs",
    metadata,
    sa.Column("blob_id", sa.String(64), primary_key=True),
    sa.Column("owner_device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("expires_at", Millis, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Index(None, "owner_device_pk"),
    sa.Index(None, "expires_at"),
)

chain_heads: Final = sa.Table(
    "chain_heads",
    metadata,
    # One row per append-only chain ("audit", "transparency"): appending updates this row first,
    # and that row lock serialises appenders on PostgreSQL (SQLite has one writer anyway), so two
    # transactions can never both extend the same head.
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.LargeBinary, nullable=False),
)

audit_log: Final = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at", Millis, nullable=False),
    # Who acted: a username, or "operator" for a server command run on the host.
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    # What was acted on: a username, "username/device", or "" (never names, codes or health data).
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("result", sa.String(16), nullable=False),
    sa.Column("detail", sa.String(500), nullable=False),
    # SHA-256 over the previous record's hash and this record's canonical encoding.
    sa.Column("prev_hash", sa.LargeBinary, nullable=False),
    sa.Column("record_hash", sa.LargeBinary, nullable=False),
    sa.Index(None, "at"),
)

log_entries: Final = sa.Table(
    "log_entries",
    metadata,
    # The leaf index in the transparency log (0-based, dense, assigned under the chain head lock).
    sa.Column("leaf_index", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("user_seq", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(24), nullable=False),
    # The canonical event encoding (medrelay.crypto.transparency): the Merkle leaf's data.
    sa.Column("event", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.UniqueConstraint("user_id", "user_seq"),
)

care_links: Final = sa.Table(
    "care_links",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    sa.Column("clinician_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    # The in-person visit that founded the link, as an ISO date (YYYY-MM-DD, clinic calendar).
    sa.Column("visit_date", sa.String(10), nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False),
    # The link is active while created_at <= now < ends_at and it was not ended early.
    sa.Column("ends_at", Millis, nullable=False),
    sa.Column("ended_at", Millis, nullable=True),
    sa.Column("ended_by", sa.String(64), nullable=True),
    sa.Index(None, "patient_pk", "clinician_pk"),
    sa.Index(None, "clinician_pk"),
)

# --- availability (migration 0004) -------------------------------------------------------------

schedules: Final = sa.Table(
    "schedules",
    metadata,
    # One row per account that set anything: a patient only a time zone; a clinician hours,
    # an automatic-reply template and an "available until" override too. No row, or NULL
    # hours: the clinician has no hours and counts as always available.
    sa.Column(
        "account_pk",
        sa.Integer,
        sa.ForeignKey("accounts.pk"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("time_zone", sa.String(64), nullable=True),
    # JSON array of [weekday, start minute, end minute] (medrelay.server.availability).
    sa.Column("hours", sa.Text, nullable=True),
    sa.Column("autoreply", sa.Text, nullable=True),
    sa.Column("available_until", Millis, nullable=True),
    sa.Column("updated_at", Millis, nullable=False),
)

absences: Final = sa.Table(
    "absences",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("account_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    # Whole local days (the clinician's zone), YYYY-MM-DD, inclusive.
    sa.Column("first_day", sa.String(10), nullable=False),
    sa.Column("last_day", sa.String(10), nullable=False),
    sa.Column("reason", sa.String(16), nullable=False),
    sa.CheckConstraint(_in("reason", ABSENCE_REASONS), name="reason"),
    sa.Index(None, "account_pk"),
)

holidays: Final = sa.Table(
    "holidays",
    metadata,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
)

on_call_shifts: Final = sa.Table(
    "on_call_shifts",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("clinician_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    sa.Column("department", sa.String(200), nullable=False),
    sa.Column("starts_at", Millis, nullable=False),
    sa.Column("ends_at", Millis, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Index(None, "department", "ends_at"),
)

held_items: Final = sa.Table(
    "held_items",
    metadata,
    # A patient's envelope for a clinician's device, waiting for the clinician's hours. Moved
    # into queue_items (in pk order, in one group commit) at the opening.
    sa.Column("pk", BigKey, primary_key=True, autoincrement=True),
    sa.Column("clinician_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    sa.Column("device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("peer_user", sa.String(64), nullable=False),
    sa.Column("peer_device", sa.String(64), nullable=False),
    sa.Column("message_id", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Column("sender_device_pk", sa.Integer, sa.ForeignKey("devices.pk"), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("flags", sa.Integer, nullable=False),
    sa.Index(None, "clinician_pk", "pk"),
    sqlite_autoincrement=True,
)

auto_replies: Final = sa.Table(
    "auto_replies",
    metadata,
    # One automatic reply per (patient, clinician, off-hours window); the window is named by
    # the instant it ends (the clinician's next opening).
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("accounts.pk"), primary_key=True),
    sa.Column("clinician_pk", sa.Integer, sa.ForeignKey("accounts.pk"), primary_key=True),
    sa.Column("window_end", Millis, primary_key=True, autoincrement=False),
    sa.Column("created_at", Millis, nullable=False),
    sa.Index(None, "created_at"),
)

awaiting_replies: Final = sa.Table(
    "awaiting_replies",
    metadata,
    # The oldest unanswered message of a patient to a clinician (first-reply time metric).
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("accounts.pk"), primary_key=True),
    sa.Column("clinician_pk", sa.Integer, sa.ForeignKey("accounts.pk"), primary_key=True),
    sa.Column("since", Millis, nullable=False),
)

# --- teleconsultation visits (migration 0005) ---------------------------------------------------

visits: Final = sa.Table(
    "visits",
    metadata,
    # "V" and 8 Crockford base32 characters, made by the server (medrelay.server.visits).
    sa.Column("visit_id", sa.String(32), primary_key=True),
    # The id clients give the visit's messages as their thread (16 random bytes).
    sa.Column("thread_id", sa.LargeBinary, nullable=False),
    sa.Column("patient_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    sa.Column("clinician_pk", sa.Integer, sa.ForeignKey("accounts.pk"), nullable=False),
    # One of the clinic's indication codes at opening (the list may change later).
    sa.Column("indication", sa.String(64), nullable=False),
    # The clinic's consent mode at opening: a later change of policy does not rewrite it.
    sa.Column("consent", sa.String(16), nullable=False),
    sa.Column("opened_at", Millis, nullable=False),
    # Closed: when, and the id of the conclusion message (its content travels end to end).
    sa.Column("closed_at", Millis, nullable=True),
    sa.Column("conclusion_id", sa.LargeBinary, nullable=True),
    sa.UniqueConstraint("thread_id"),
    sa.CheckConstraint(_in("consent", CONSENT_MODES), name="consent"),
    sa.CheckConstraint(
        "(closed_at IS NULL AND conclusion_id IS NULL)"
        " OR (closed_at IS NOT NULL AND conclusion_id IS NOT NULL)",
        name="closed",
    ),
    sa.Index(None, "patient_pk", "opened_at"),
    sa.Index(None, "clinician_pk", "opened_at"),
)


ALL_TABLES: Final = tuple(metadata.sorted_tables)
"""Every table, parents before children (creation order; reverse it to delete)."""
