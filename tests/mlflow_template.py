"""Fresh sqlite MLflow stores without paying MLflow's migrations each time.

A new sqlite store costs MLflow its whole schema history: `create_all` then every alembic migration (~70
scripts, ~330 DDL statements, each committed): 1.5-2 s of CPU and as much again in fsyncs, paid by every test
that opens a store of its own. Here the migrations run once per session, into a template file, and every
later new store is that file copied (the sqlite backup API), byte for byte the schema MLflow would have built.

- `install(template)`: in this process, MLflow's `_initialize_tables` (called on a store whose tables are
  missing) fills a sqlite store from the template, building the template the first time with the real
  function; other databases (PostgreSQL) and in-memory stores go through the real one.
- `seed(uri)`: for a store another process will open first (an `mlflow server` on a sqlite URI): fills the
  file from the template now, when there is no file yet (after `install`; otherwise nothing).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

_INSTALLED: list = []  # the installed replacement of `_initialize_tables` (one per session)
_LOCK = threading.Lock()


def _sqlite_file(engine) -> str | None:
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    return None if not database or database == ":memory:" else database


def install(template: Path) -> None:
    import sqlalchemy

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store

    real = db_utils._initialize_tables

    def initialize_from_template(engine) -> None:
        if _sqlite_file(engine) is None:
            return real(engine)
        with _LOCK:
            if not template.exists():
                built = sqlalchemy.create_engine(f"sqlite:///{template}")
                try:
                    real(built)
                finally:
                    built.dispose()
        raw = engine.raw_connection()
        try:
            with closing(sqlite3.connect(template)) as source:
                source.backup(raw.driver_connection)
        finally:
            raw.close()

    db_utils._initialize_tables = initialize_from_template
    registry_store._initialize_tables = initialize_from_template  # imported by name there
    _INSTALLED[:] = [initialize_from_template]


def seed(uri: str) -> None:
    if not _INSTALLED or not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        return
    import sqlalchemy

    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(uri)
    try:
        _INSTALLED[0](engine)
    finally:
        engine.dispose()
