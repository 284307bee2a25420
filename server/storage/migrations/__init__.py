"""The Alembic environment of the relay's database (`env.py`, `script.py.mako`, `versions/`).

It ships inside the package and is located as the package resource
`medrelay.server.storage:migrations`, so migrations run the same from a checkout and from an
installed wheel. Use `medrelay.server.storage.migrate` rather than the `alembic` command line.
"""
