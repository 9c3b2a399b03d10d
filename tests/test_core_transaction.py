"""core.catalog.transaction: the catalog's all-or-nothing writes, on a real DuckDB."""

from __future__ import annotations

import duckdb
import pytest

from blip3.core.catalog import transaction


def test_a_block_commits_or_rolls_back_whole():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (x INTEGER NOT NULL)")
    with transaction(con):
        con.execute("INSERT INTO t VALUES (1)")
        con.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(duckdb.ConstraintException):
        with transaction(con):
            con.execute("DELETE FROM t")
            con.execute("INSERT INTO t VALUES (NULL)")
    assert sorted(r[0] for r in con.execute("SELECT x FROM t").fetchall()) == [1, 2]
    with transaction(con):  # the connection is usable again
        con.execute("INSERT INTO t VALUES (3)")
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 3
