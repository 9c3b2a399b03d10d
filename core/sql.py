"""Read-only SQL over the catalog for `blip3 sql`.

Two locks: the file is opened with `read_only=True`, and each statement's parsed type must be a
query (SELECT, incl. WITH/SHOW/DESCRIBE/SUMMARIZE, or EXPLAIN). `COPY ... TO`, `ATTACH`,
`EXPORT`, `INSTALL/LOAD`, `SET`, `PRAGMA`, `CALL` and every DDL/DML are refused before they run:
a read-only file alone would still let `COPY TO` write files or `ATTACH` open another database.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from blip3.core.catalog import resolve_db
from blip3.core.errors import UserError

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def check_read_only(sql: str) -> None:
    """Raise UserError unless every statement in `sql` only reads."""
    try:
        statements = duckdb.connect().extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {_one_line(e)}") from None
    if not statements:
        raise UserError("empty query")
    for st in statements:
        if st.type not in _ALLOWED:
            kind = str(st.type).rsplit(".", 1)[-1]
            raise UserError(
                f"refused: {kind} statements are not allowed; `blip3 sql` is read-only "
                f"(use SELECT; write results with --format/--out)"
            )
        if st.type == duckdb.StatementType.EXPLAIN and "analyze" in st.query.lower():
            raise UserError("refused: EXPLAIN ANALYZE runs the statement; use EXPLAIN")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def run_query(sql: str, db: str | Path | None = None) -> pa.Table:
    """Run a read-only query on the catalog and return an Arrow table."""
    check_read_only(sql)
    path = resolve_db(db)
    if not path.exists():
        raise UserError("catalog not found (create it with `blip3 catalog add` or set --db/BLIP3_DB)", file=path)
    con = duckdb.connect(str(path), read_only=True)
    try:
        rel = con.sql(sql)
        return pa.table({}) if rel is None else rel.to_arrow_table()
    except duckdb.Error as e:
        raise UserError(f"SQL error: {_one_line(e)}") from None
    finally:
        con.close()
