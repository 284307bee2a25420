"""Small SQL helpers shared by the store modules (dialect-specific statement builders).

Both supported databases speak `INSERT ... ON CONFLICT` and `RETURNING` (SQLite since 3.35), but
SQLAlchemy exposes them per dialect; `insert_for` picks the right construct so store functions stay
one code path.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection


def insert_for(conn: Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT for `table` that supports `on_conflict_do_nothing/_do_update` on this
    connection's database."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
