"""`blip3 sql` is read-only: each of its two locks holds on its own, on a real DuckDB catalog."""

from __future__ import annotations

import pytest

import blip3.core.sql as sql_module
from blip3.core.catalog import Catalog
from blip3.core.errors import UserError
from blip3.core.sql import run_query
from tests.core_fixtures import write_caption_shard
from tests.test_core_catalog import blip3, counts


@pytest.fixture
def catalog(tmp_path):
    out = tmp_path / "ocr-en"
    write_caption_shard(out, 0, 5, n_failed=1)
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(out)
    return db


@pytest.mark.parametrize("stmt", ["EXPLAIN ANALYZE DELETE FROM samples", "explain analyse delete from samples",
                                  "WITH x AS (DELETE FROM samples RETURNING key) SELECT count(*) FROM x"])
def test_explain_analyze_delete_is_refused_and_deletes_nothing(catalog, stmt):
    before = counts(catalog)
    assert before[2] == 6
    r = blip3("sql", stmt, "--db", str(catalog))
    assert r.returncode == 2
    assert "refused" in r.stderr and "Traceback" not in r.stderr
    assert counts(catalog) == before


def test_plain_explain_still_answers(catalog):
    r = blip3("sql", "EXPLAIN SELECT count(*) FROM samples", "--db", str(catalog))
    assert r.returncode == 0, r.stderr
    assert "explain_value" in r.stdout and "physical_plan" in r.stdout


def test_catalog_file_is_opened_read_only_even_past_the_statement_check(catalog, monkeypatch):
    """Second lock alone: with the statement check switched off, the file itself refuses writes."""
    monkeypatch.setattr(sql_module, "check_read_only", lambda sql: None)
    before = counts(catalog)
    with pytest.raises(UserError, match="read-only"):
        run_query("DELETE FROM samples", catalog)
    assert counts(catalog) == before
