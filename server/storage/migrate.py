"""Schema migrations: bring a database to the Alembic head, and tell whether it is there.

Used by `medrelay-server migrate` and at server start (before the reactor runs, so these functions
are synchronous). A target is a database URL (an engine is made with the relay's connection
settings and disposed afterwards), an `Engine`, or a `Connection` (then the migration runs inside
the caller's transaction and the caller commits).

The Alembic environment is the package resource `medrelay.server.storage:migrations`; no
alembic.ini is needed. To write a new revision after changing `schema.py`:

    from alembic import command
    from medrelay.server.storage.migrate import alembic_config
    command.revision(alembic_config("sqlite:///var/dev.db"), "what changed", autogenerate=True)

then edit the generated file (give it a readable revision id like the existing ones) and make
sure the schema test still finds no difference on both databases.
"""

from __future__ import annotations

from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from medrelay.server.storage.database import make_engine
from medrelay.server.storage.errors import SchemaOutOfDate

SCRIPT_LOCATION: Final = "medrelay.server.storage:migrations"

Target = str | Engine | Connection


def alembic_config(target: Target) -> Config:
    """An Alembic `Config` for our environment, pointed at `target`.

    The target travels in `config.attributes` (never in the ini options, where a password with a
    `%` would be mangled by interpolation)."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if isinstance(target, Connection):
        config.attributes["connection"] = target
    elif isinstance(target, Engine):
        config.attributes["engine"] = target
    else:
        config.attributes["url"] = target
    return config


def head_revision() -> str:
    """The newest revision shipped with this version of medrelay."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:  # pragma: no cover - the package ships revisions
        raise SchemaOutOfDate("the migrations package has no revisions")
    return head


def upgrade_to_head(target: Target) -> None:
    """Apply every migration the database lacks (in one transaction where the database allows
    transactional DDL, which both SQLite and PostgreSQL do). A no-op when already at head."""
    command.upgrade(alembic_config(target), "head")


def current_revision(target: Target) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    if isinstance(target, Connection):
        return MigrationContext.configure(target).get_current_revision()
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if isinstance(target, str):
            engine.dispose()


def is_up_to_date(target: Target) -> bool:
    """Whether the database is exactly at the head revision."""
    return current_revision(target) == head_revision()


def require_up_to_date(target: Target) -> None:
    """Raise `SchemaOutOfDate` (naming both revisions) unless the database is at head."""
    current = current_revision(target)
    head = head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none'}, this relay needs {head}; "
            "run `medrelay-server migrate`"
        )
