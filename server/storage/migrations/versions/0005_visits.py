"""Teleconsultation visits.

- `visits`: one row per visit a doctor opened for a linked patient: the server-made visit id,
  the thread id its messages carry, patient and clinician, the indication code and the consent
  mode in force at opening, when it opened, and once closed, when and the id of the conclusion
  message. Conclusions and consent travel end to end as messages; the server keeps only ids and
  times.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

Written out in full (no imports from medrelay), as 0001 is.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "visits",
        sa.Column("visit_id", sa.String(length=32), nullable=False),
        sa.Column("thread_id", sa.LargeBinary(), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("clinician_pk", sa.Integer(), nullable=False),
        sa.Column("indication", sa.String(length=64), nullable=False),
        sa.Column("consent", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.BigInteger(), nullable=False),
        sa.Column("closed_at", sa.BigInteger(), nullable=True),
        sa.Column("conclusion_id", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("consent IN ('notice', 'explicit')", name=op.f("ck_visits_consent")),
        sa.CheckConstraint(
            "(closed_at IS NULL AND conclusion_id IS NULL)"
            " OR (closed_at IS NOT NULL AND conclusion_id IS NOT NULL)",
            name=op.f("ck_visits_closed"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["accounts.pk"], name=op.f("fk_visits_patient_pk_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["clinician_pk"], ["accounts.pk"], name=op.f("fk_visits_clinician_pk_accounts")
        ),
        sa.PrimaryKeyConstraint("visit_id", name=op.f("pk_visits")),
        sa.UniqueConstraint("thread_id", name=op.f("uq_visits_thread_id")),
    )
    op.create_index(op.f("ix_visits_patient_pk_opened_at"), "visits", ["patient_pk", "opened_at"])
    op.create_index(
        op.f("ix_visits_clinician_pk_opened_at"), "visits", ["clinician_pk", "opened_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_visits_clinician_pk_opened_at"), table_name="visits")
    op.drop_index(op.f("ix_visits_patient_pk_opened_at"), table_name="visits")
    op.drop_table("visits")
