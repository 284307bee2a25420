"""Initial schema: accounts, enrollment codes, devices, sessions, prekeys, messages, queue, blobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written out in full (no imports from medrelay): a migration must keep meaning the same thing when
`schema.py` changes later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL; INTEGER on SQLite, where only that spelling makes the rowid alias.
BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("specialty", sa.String(length=200), nullable=True),
        sa.Column("department", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("identity_key", sa.LargeBinary(), nullable=True),
        sa.Column("user_certificate", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint(
            "role IN ('admin', 'registrar', 'doctor', 'nurse', 'patient', 'records')",
            name=op.f("ck_accounts_role"),
        ),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_accounts_status")),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_accounts")),
        sa.UniqueConstraint("username", name=op.f("uq_accounts_username")),
    )
    op.create_table(
        "devices",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_pk", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("signing_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.Column("queued_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_pk"], ["accounts.pk"], name=op.f("fk_devices_account_pk_accounts")
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_devices")),
        sa.UniqueConstraint(
            "account_pk", "device_id", name=op.f("uq_devices_account_pk_device_id")
        ),
    )
    op.create_table(
        "enrollment_codes",
        sa.Column("account_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("code_hash", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=True),
        sa.Column("burned", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_pk"], ["accounts.pk"], name=op.f("fk_enrollment_codes_account_pk_accounts")
        ),
        sa.PrimaryKeyConstraint("account_pk", name=op.f("pk_enrollment_codes")),
    )
    op.create_table(
        "sessions",
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.pk"], name=op.f("fk_sessions_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_sessions")),
    )
    op.create_index(op.f("ix_sessions_device_pk"), "sessions", ["device_pk"])
    op.create_index(op.f("ix_sessions_expires_at"), "sessions", ["expires_at"])
    op.create_table(
        "signed_prekeys",
        sa.Column("device_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("prekey", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.pk"], name=op.f("fk_signed_prekeys_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("device_pk", name=op.f("pk_signed_prekeys")),
    )
    op.create_table(
        "one_time_prekeys",
        sa.Column("pk", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("prekey", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.pk"], name=op.f("fk_one_time_prekeys_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_one_time_prekeys")),
    )
    op.create_index(
        op.f("ix_one_time_prekeys_device_pk_pk"), "one_time_prekeys", ["device_pk", "pk"]
    )
    op.create_table(
        "messages",
        sa.Column("pk", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("sender_device_pk", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.LargeBinary(), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sender_device_pk"], ["devices.pk"], name=op.f("fk_messages_sender_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_messages")),
        sa.UniqueConstraint(
            "sender_device_pk", "message_id", name=op.f("uq_messages_sender_device_pk_message_id")
        ),
    )
    op.create_index(op.f("ix_messages_created_at"), "messages", ["created_at"])
    op.create_table(
        "queue_items",
        sa.Column("seq", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("peer_user", sa.String(length=64), nullable=False),
        sa.Column("peer_device", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("sender_device_pk", sa.Integer(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("kind IN ('msg', 'expired')", name=op.f("ck_queue_items_kind")),
        sa.CheckConstraint(
            "(kind = 'msg' AND ciphertext IS NOT NULL AND sender_device_pk IS NOT NULL)"
            " OR (kind = 'expired' AND ciphertext IS NULL AND sender_device_pk IS NULL)",
            name=op.f("ck_queue_items_kind_fields"),
        ),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.pk"], name=op.f("fk_queue_items_device_pk_devices")
        ),
        sa.ForeignKeyConstraint(
            ["sender_device_pk"],
            ["devices.pk"],
            name=op.f("fk_queue_items_sender_device_pk_devices"),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_queue_items")),
        # A seq is never handed out twice, even after the highest row is deleted.
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_queue_items_device_pk_seq"), "queue_items", ["device_pk", "seq"])
    op.create_index(op.f("ix_queue_items_expires_at"), "queue_items", ["expires_at"])
    op.create_table(
        "blobs",
        sa.Column("blob_id", sa.String(length=64), nullable=False),
        sa.Column("owner_device_pk", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_device_pk"], ["devices.pk"], name=op.f("fk_blobs_owner_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("blob_id", name=op.f("pk_blobs")),
    )
    op.create_index(op.f("ix_blobs_owner_device_pk"), "blobs", ["owner_device_pk"])
    op.create_index(op.f("ix_blobs_expires_at"), "blobs", ["expires_at"])


def downgrade() -> None:
    for table in (
        "blobs",
        "queue_items",
        "messages",
        "one_time_prekeys",
        "signed_prekeys",
        "sessions",
        "enrollment_codes",
        "devices",
        "accounts",
    ):
        op.drop_table(table)
