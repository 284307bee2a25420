"""medrelay.server.storage: everything that touches the database.

`database` (the engine, the thread the SQL runs on, `run_interaction`, durability checks),
`schema` (the tables), `migrations` + `migrate` (Alembic), and the store functions grouped by what
they own: `accounts`, `devices`, `prekeys`, `queue`, `blobs`, `care` (care links). Store
functions are synchronous `*_txn(conn, ...)` functions returning frozen dataclasses; they are run
through `Database.run_interaction`, never on the reactor thread. Errors are in `errors`.
"""
