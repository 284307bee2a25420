"""The heads of the append-only, hash-chained logs (`chain_heads`: the audit log and the identity
transparency log).

An appender locks its chain's head row first and updates it last, in its own transaction: the row
lock serialises appenders on PostgreSQL (SQLite has one writer anyway), so two transactions can
never both extend the same head, and the head always names the last record committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medrelay.server.storage.schema import chain_heads
from medrelay.server.storage.sql import insert_for

GENESIS_HASH: Final = bytes(32)
"""The head hash of an empty chain."""


@dataclass(frozen=True, slots=True)
class ChainHead:
    size: int
    head_hash: bytes


def lock_chain_head_txn(conn: Connection, name: str) -> ChainHead:
    """Lock the chain's head row until the transaction ends (creating it on first use); returns
    the head as it is now."""
    # A no-op UPDATE takes the row lock on PostgreSQL (SQLite has no FOR UPDATE; this is one
    # statement for both) and returns the head in the common case.
    lock = (
        sa.update(chain_heads)
        .where(chain_heads.c.name == name)
        .values(size=chain_heads.c.size)
        .returning(chain_heads.c.size, chain_heads.c.head_hash)
    )
    row = conn.execute(lock).first()
    if row is None:
        # First use. Of two first appenders on PostgreSQL the second waits on the primary key
        # and then does nothing; its UPDATE below then waits for (and sees) the first's head.
        conn.execute(
            insert_for(conn, chain_heads)
            .values(name=name, size=0, head_hash=GENESIS_HASH)
            .on_conflict_do_nothing(index_elements=[chain_heads.c.name])
        )
        row = conn.execute(lock).one()
    return ChainHead(int(row.size), bytes(row.head_hash))


def set_chain_head_txn(conn: Connection, name: str, head: ChainHead) -> None:
    conn.execute(
        sa.update(chain_heads)
        .where(chain_heads.c.name == name)
        .values(size=head.size, head_hash=head.head_hash)
    )


def read_chain_head_txn(conn: Connection, name: str) -> ChainHead:
    row = conn.execute(
        sa.select(chain_heads.c.size, chain_heads.c.head_hash).where(chain_heads.c.name == name)
    ).first()
    return ChainHead(0, GENESIS_HASH) if row is None else ChainHead(int(row.size), row.head_hash)
