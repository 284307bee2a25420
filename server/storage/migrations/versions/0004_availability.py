"""Availability: schedules, absences, holidays, the on-call roster, held messages, automatic
replies, and clinic notices in the delivery queue.

- `schedules`: a time zone per account; hours, automatic-reply template and "available until"
  override per clinician.
- `absences`, `holidays`, `on_call_shifts`: whole days away, the clinic's public holidays, who
  answers urgent messages for a department when.
- `held_items`: patients' envelopes waiting for a clinician's hours (moved to the queue then).
- `auto_replies`: one automatic reply per patient, clinician and off-hours window.
- `awaiting_replies`: a patient's oldest unanswered message to a clinician (first-reply time).
- `queue_items`: a `flags` column (urgent, after hours, held) and a third kind, "notice" (a
  clinic-signed notice held in `ciphertext`). SQLite cannot alter a CHECK constraint, so there
  the table is rebuilt (Alembic's batch mode), keeping its AUTOINCREMENT high-water mark: a
  queue seq is never handed out twice.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

Written out in full (no imports from medrelay), as 0001 is.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OLD_KINDS = "kind IN ('msg', 'expired')"
OLD_FIELDS = (
    "(kind = 'msg' AND ciphertext IS NOT NULL AND sender_device_pk IS NOT NULL)"
    " OR (kind = 'expired' AND ciphertext IS NULL AND sender_device_pk IS NULL)"
)
NEW_KINDS = "kind IN ('msg', 'expired', 'notice')"
NEW_FIELDS = (
    OLD_FIELDS + " OR (kind = 'notice' AND ciphertext IS NOT NULL AND sender_device_pk IS NULL)"
)


def _queue_items(kinds: str, fields: str) -> sa.Table:
    """queue_items as 0001 created it (with the given checks), for SQLite's table rebuild."""
    return sa.Table(
        "queue_items",
        sa.MetaData(),
        sa.Column("seq", BIG_KEY, primary_key=True, autoincrement=True),
        sa.Column("device_pk", sa.Integer(), sa.ForeignKey("devices.pk"), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("peer_user", sa.String(length=64), nullable=False),
        sa.Column("peer_device", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("sender_device_pk", sa.Integer(), sa.ForeignKey("devices.pk"), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint(kinds, name="ck_queue_items_kind"),
        sa.CheckConstraint(fields, name="ck_queue_items_kind_fields"),
        sa.Index("ix_queue_items_device_pk_seq", "device_pk", "seq"),
        sa.Index("ix_queue_items_expires_at", "expires_at"),
        sqlite_autoincrement=True,
    )


def _alter_queue_items(old: tuple[str, str], new: tuple[str, str], *, add_flags: bool) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        if add_flags:
            op.add_column(
                "queue_items",
                sa.Column("flags", sa.Integer(), nullable=False, server_default="0"),
            )
        else:
            op.drop_column("queue_items", "flags")
        op.drop_constraint(op.f("ck_queue_items_kind"), "queue_items", type_="check")
        op.drop_constraint(op.f("ck_queue_items_kind_fields"), "queue_items", type_="check")
        op.create_check_constraint(op.f("ck_queue_items_kind"), "queue_items", new[0])
        op.create_check_constraint(op.f("ck_queue_items_kind_fields"), "queue_items", new[1])
        return
    high_water = conn.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'queue_items'"
    ).scalar()
    source = _queue_items(*old)
    if not add_flags:
        source.append_column(sa.Column("flags", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table(
        "queue_items",
        copy_from=source,
        recreate="always",
        table_kwargs={"sqlite_autoincrement": True},
    ) as batch:
        if add_flags:
            batch.add_column(sa.Column("flags", sa.Integer(), nullable=False, server_default="0"))
        else:
            batch.drop_column("flags")
        batch.drop_constraint(op.f("ck_queue_items_kind"), type_="check")
        batch.drop_constraint(op.f("ck_queue_items_kind_fields"), type_="check")
        batch.create_check_constraint(op.f("ck_queue_items_kind"), new[0])
        batch.create_check_constraint(op.f("ck_queue_items_kind_fields"), new[1])
    if high_water is not None:
        conn.exec_driver_sql(
            "UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'queue_items'",
            (int(high_water),),
        )
        conn.exec_driver_sql(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'queue_items', ?"
            " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'queue_items')",
            (int(high_water),),
        )


def upgrade() -> None:
    _alter_queue_items((OLD_KINDS, OLD_FIELDS), (NEW_KINDS, NEW_FIELDS), add_flags=True)
    op.create_table(
        "schedules",
        sa.Column("account_pk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("time_zone", sa.String(length=64), nullable=True),
        sa.Column("hours", sa.Text(), nullable=True),
        sa.Column("autoreply", sa.Text(), nullable=True),
        sa.Column("available_until", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_pk"], ["accounts.pk"], name=op.f("fk_schedules_account_pk_accounts")
        ),
        sa.PrimaryKeyConstraint("account_pk", name=op.f("pk_schedules")),
    )
    op.create_table(
        "absences",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_pk", sa.Integer(), nullable=False),
        sa.Column("first_day", sa.String(length=10), nullable=False),
        sa.Column("last_day", sa.String(length=10), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.CheckConstraint(
            "reason IN ('vacation', 'sick', 'other')", name=op.f("ck_absences_reason")
        ),
        sa.ForeignKeyConstraint(
            ["account_pk"], ["accounts.pk"], name=op.f("fk_absences_account_pk_accounts")
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_absences")),
    )
    op.create_index(op.f("ix_absences_account_pk"), "absences", ["account_pk"])
    op.create_table(
        "holidays",
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_holidays")),
    )
    op.create_table(
        "on_call_shifts",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("clinician_pk", sa.Integer(), nullable=False),
        sa.Column("department", sa.String(length=200), nullable=False),
        sa.Column("starts_at", sa.BigInteger(), nullable=False),
        sa.Column("ends_at", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["clinician_pk"],
            ["accounts.pk"],
            name=op.f("fk_on_call_shifts_clinician_pk_accounts"),
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_on_call_shifts")),
    )
    op.create_index(
        op.f("ix_on_call_shifts_department_ends_at"), "on_call_shifts", ["department", "ends_at"]
    )
    op.create_table(
        "held_items",
        sa.Column("pk", BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("clinician_pk", sa.Integer(), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("peer_user", sa.String(length=64), nullable=False),
        sa.Column("peer_device", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("sender_device_pk", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("flags", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["clinician_pk"], ["accounts.pk"], name=op.f("fk_held_items_clinician_pk_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.pk"], name=op.f("fk_held_items_device_pk_devices")
        ),
        sa.ForeignKeyConstraint(
            ["sender_device_pk"],
            ["devices.pk"],
            name=op.f("fk_held_items_sender_device_pk_devices"),
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_held_items")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_held_items_clinician_pk_pk"), "held_items", ["clinician_pk", "pk"])
    op.create_table(
        "auto_replies",
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("clinician_pk", sa.Integer(), nullable=False),
        sa.Column("window_end", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["accounts.pk"], name=op.f("fk_auto_replies_patient_pk_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["clinician_pk"],
            ["accounts.pk"],
            name=op.f("fk_auto_replies_clinician_pk_accounts"),
        ),
        sa.PrimaryKeyConstraint(
            "patient_pk", "clinician_pk", "window_end", name=op.f("pk_auto_replies")
        ),
    )
    op.create_index(op.f("ix_auto_replies_created_at"), "auto_replies", ["created_at"])
    op.create_table(
        "awaiting_replies",
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("clinician_pk", sa.Integer(), nullable=False),
        sa.Column("since", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["accounts.pk"], name=op.f("fk_awaiting_replies_patient_pk_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["clinician_pk"],
            ["accounts.pk"],
            name=op.f("fk_awaiting_replies_clinician_pk_accounts"),
        ),
        sa.PrimaryKeyConstraint("patient_pk", "clinician_pk", name=op.f("pk_awaiting_replies")),
    )


def downgrade() -> None:
    op.drop_table("awaiting_replies")
    op.drop_index(op.f("ix_auto_replies_created_at"), table_name="auto_replies")
    op.drop_table("auto_replies")
    op.drop_index(op.f("ix_held_items_clinician_pk_pk"), table_name="held_items")
    op.drop_table("held_items")
    op.drop_index(op.f("ix_on_call_shifts_department_ends_at"), table_name="on_call_shifts")
    op.drop_table("on_call_shifts")
    op.drop_table("holidays")
    op.drop_index(op.f("ix_absences_account_pk"), table_name="absences")
    op.drop_table("absences")
    op.drop_table("schedules")
    # Notices cannot survive in the old table: they go (they are only automatic replies).
    op.execute("DELETE FROM queue_items WHERE kind = 'notice'")
    _alter_queue_items((NEW_KINDS, NEW_FIELDS), (OLD_KINDS, OLD_FIELDS), add_flags=False)
