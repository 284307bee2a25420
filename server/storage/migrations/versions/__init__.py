"""Alembic revision scripts, oldest first by their `down_revision` chain (not imported directly:
Alembic loads them by file)."""
