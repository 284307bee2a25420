"""Identity authority: append-only chains (audit log, transparency log) and care links.

- `chain_heads`: one row per append-only chain; appenders update it first, and that row lock
  serialises them on PostgreSQL.
- `audit_log`: the hash-chained audit log (actor, action, target, time, result).
- `log_entries`: the transparency log's leaves (certificate events), with a per-user sequence.
- `care_links`: patient-clinician care relationships (in-person visit date, end date).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Written out in full (no imports from medrelay), as 0001 is.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "chain_heads",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_chain_heads")),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(), nullable=False),
        sa.Column("record_hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_table(
        "log_entries",
        sa.Column("leaf_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("user_seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("leaf_index", name=op.f("pk_log_entries")),
        sa.UniqueConstraint("user_id", "user_seq", name=op.f("uq_log_entries_user_id_user_seq")),
    )
    op.create_table(
        "care_links",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("clinician_pk", sa.Integer(), nullable=False),
        sa.Column("visit_date", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("ends_at", sa.BigInteger(), nullable=False),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("ended_by", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["accounts.pk"], name=op.f("fk_care_links_patient_pk_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["clinician_pk"], ["accounts.pk"], name=op.f("fk_care_links_clinician_pk_accounts")
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_care_links")),
    )
    op.create_index(
        op.f("ix_care_links_patient_pk_clinician_pk"), "care_links", ["patient_pk", "clinician_pk"]
    )
    op.create_index(op.f("ix_care_links_clinician_pk"), "care_links", ["clinician_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_care_links_clinician_pk"), table_name="care_links")
    op.drop_index(op.f("ix_care_links_patient_pk_clinician_pk"), table_name="care_links")
    op.drop_table("care_links")
    op.drop_table("log_entries")
    op.drop_index(op.f("ix_audit_log_at"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("chain_heads")
