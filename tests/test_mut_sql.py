"""`blip3 sql`'s locked DuckDB configuration, each setting seen from a query on a real catalog, and
the refusal message naming the statement kind."""

from __future__ import annotations

import pytest

import blip3.core.sql as sql_module
from blip3.core.catalog import Catalog
from blip3.core.errors import UserError
from blip3.core.sql import check_read_only, run_query
from tests.core_fixtures import write_caption_shard


@pytest.fixture
def catalog(tmp_path):
    out = tmp_path / "ocr-en"
    write_caption_shard(out, 0, 3)
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(out)
    return db


def test_a_query_cannot_read_files_beside_the_catalog(catalog, tmp_path):
    """A SELECT passes the statement check; the connection itself refuses file access."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    with pytest.raises(UserError, match="refused") as e:
        run_query(f"SELECT content FROM read_text('{secret}')", catalog)
    assert "s3cr3t" not in str(e.value)


@pytest.mark.parametrize("setting", ["autoinstall_known_extensions", "autoload_known_extensions",
                                     "allow_community_extensions"])
def test_extensions_are_neither_installed_nor_loaded(catalog, setting):
    got = run_query(f"SELECT current_setting('{setting}') AS v", catalog).column("v").to_pylist()
    assert got == [False]


def test_settings_cannot_be_changed_even_past_the_statement_check(catalog, monkeypatch):
    monkeypatch.setattr(sql_module, "check_read_only", lambda sql: None)
    with pytest.raises(UserError, match="refused: .*locked"):
        run_query("SET threads = 1", catalog)


@pytest.mark.parametrize("stmt, kind", [("DELETE FROM samples", "DELETE"), ("SET threads = 1", "SET"),
                                        ("CREATE TABLE t (a INT)", "CREATE")])
def test_refusal_names_the_statement_kind(stmt, kind):
    with pytest.raises(UserError) as e:
        check_read_only(stmt)
    assert str(e.value).startswith(f"refused: {kind} statements are not allowed")


def test_empty_sql_is_refused():
    with pytest.raises(UserError, match="empty query"):
        check_read_only("  ;  ")
