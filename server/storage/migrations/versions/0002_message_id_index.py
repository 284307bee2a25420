"""Index messages by message id alone.

The group commit looks up the ids of a whole batch of sends at once; with only the
(sender device, message id) unique index, `sender IN (...) AND id IN (...)` probes every pair
(200 sends: 40,000 probes). Message ids are random 128-bit values, so an index on the id alone
answers the batch with one probe per send.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_messages_message_id"), "messages", ["message_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_message_id"), table_name="messages")
