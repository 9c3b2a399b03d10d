"""Read-only SQL over the catalog for `blip3 sql`.

The lock is DuckDB's own configuration, not a reading of the SQL text (text checks were beaten by
`WITH x AS (COPY ... TO 'f')` and the British `EXPLAIN ANALYSE`). Each query runs on a connection
opened with:

- `read_only=True`: no statement can change the catalog (`DELETE ... RETURNING` in a CTE included);
- `enable_external_access=false`: no file but the catalog itself can be read or written, so
  `COPY ... TO`, `EXPORT DATABASE`, `ATTACH`, `read_text`/`read_csv`/`read_blob`/`glob`, and
  `http(s)://` paths are refused by DuckDB;
- `autoinstall_known_extensions=false`, `autoload_known_extensions=false`,
  `allow_community_extensions=false`: nothing is downloaded or loaded (no `~/.duckdb/extensions`);
- `lock_configuration=true`: `SET`/`RESET`/`PRAGMA` cannot undo any of the above.

Queries do not read the shards' sidecar parquets: every sidecar row is already in the catalog's
`samples` table, and allowing the shard folders would let a query read whatever else lies in them.

Before running, statements are parsed and any that is not a query (SELECT/WITH/SHOW/DESCRIBE/
SUMMARIZE/EXPLAIN) is refused, so a user typing `SET` or `CALL` gets a plain "refused" at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from blip3.core.catalog import open_catalog, resolve_db
from blip3.core.errors import UserError

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

LOCKED_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,
}


def check_read_only(sql: str) -> None:
    """Raise UserError unless every statement in `sql` is a query (the parser's verdict)."""
    con = duckdb.connect(config=dict(LOCKED_CONFIG))
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {_one_line(e)}") from None
    finally:
        con.close()
    if not statements:
        raise UserError("empty query")
    for st in statements:
        if st.type not in _ALLOWED:
            kind = str(st.type).rsplit(".", 1)[-1]
            raise UserError(
                f"refused: {kind} statements are not allowed; `blip3 sql` is read-only "
                f"(use SELECT; write results with --format/--out)"
            )


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def run_query(sql: str, db: str | Path | None = None) -> pa.Table:
    """Run a read-only query on the catalog and return an Arrow table."""
    check_read_only(sql)
    path = resolve_db(db)
    if not path.exists():
        raise UserError("catalog not found (create it with `blip3 catalog add` or set --db/BLIP3_DB)", file=path)
    con = open_catalog(path, read_only=True, config=dict(LOCKED_CONFIG))
    try:
        rel = con.sql(sql)
        return pa.table({}) if rel is None else rel.to_arrow_table()
    except duckdb.PermissionException as e:
        raise UserError(f"refused: {_one_line(e)} (`blip3 sql` reads the catalog only)") from None
    except duckdb.Error as e:
        message = _one_line(e)
        if "read-only mode" in message or "configuration has been locked" in message:
            raise UserError(f"refused: {message}") from None
        raise UserError(f"SQL error: {message}") from None
    finally:
        con.close()
