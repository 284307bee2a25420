"""The Alembic environment: how a migration reaches the database (run by Alembic, not imported).

The target comes from `config.attributes` (see `medrelay.server.storage.migrate.alembic_config`):
a `connection` (migrate inside the caller's transaction), an `engine`, or a `url` (an engine with
the relay's own connection settings, disposed afterwards). Offline `--sql` mode is not supported.

SQLite cannot ALTER most things, so autogenerate renders batch operations there
(`render_as_batch`). Its DDL is transactional with our `BEGIN IMMEDIATE` setup, so the whole
upgrade runs in one transaction on both databases (`transactional_ddl=True`).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection, Engine

from medrelay.server.storage.database import make_engine
from medrelay.server.storage.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported")
    attributes = context.config.attributes
    connection = attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    engine = attributes.get("engine")
    owned = not isinstance(engine, Engine)
    if owned:
        url = attributes.get("url")
        if not isinstance(url, str):
            raise RuntimeError("no connection, engine or url given to the migration environment")
        engine = make_engine(url)
    if not isinstance(engine, Engine):  # pragma: no cover - guarded above
        raise RuntimeError("not an Engine")
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        if owned:
            engine.dispose()


_main()
