"""URL lists (a local HTTP server on 127.0.0.1) -> OCR shards; export and re-import."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import iter_shard, read_sidecar
from tests.ocr_fixtures import LocalServer, png_bytes, text_image

pytestmark = pytest.mark.slow
WORDS = {"sign0.png": "OPEN 24", "sign1.png": "HALL 7", "sign2.png": "STOP"}


def _records(out) -> dict[str, dict]:
    return {json.loads(s["json"])["uid"]: json.loads(s["json"]) for t in sorted(out.glob("*.tar")) for s in iter_shard(t)}


def test_url_list_to_ocr_shards_with_failures_export_and_reimport(ray_local, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for name, word in WORDS.items():
        (www / name).write_bytes(png_bytes(text_image(word)))
    (www / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)
    with LocalServer(www) as server:
        names = ["sign0.png", "missing.png", "sign1.png", "corrupt.jpg", "sign2.png"]
        lines = ["url,caption,uid"] + [f"{server.url}/{n},alt text {i},uid-{i}" for i, n in enumerate(names)]
        urls = tmp_path / "urls.csv"
        urls.write_text("\n".join(lines) + "\n")
        out, db = tmp_path / "out", tmp_path / "catalog.duckdb"
        r = CliRunner().invoke(app, ["ocr", str(urls), str(out), "--workers", "1", "--db", str(db), "--source", "web"])
        assert r.exit_code == 0, r.output

        rows = {row["uid"]: row for row in read_sidecar(out / "00000.parquet").to_pylist()}
        assert set(rows) == {f"uid-{i}" for i in range(5)}
        assert rows["uid-1"]["status"] == "failed" and rows["uid-1"]["error_message"].startswith("download: HTTP Error 404")
        assert rows["uid-3"]["status"] == "failed" and rows["uid-3"]["error_message"].startswith("decode:")
        assert rows["uid-1"]["url"] == f"{server.url}/missing.png"
        con = duckdb.connect(str(db), read_only=True)
        reasons = dict(con.execute("SELECT split_part(error_message, ':', 1), count(*) FROM samples WHERE source = 'web' "
                                   "AND status = 'failed' GROUP BY 1").fetchall())
        con.close()
        assert reasons == {"download": 1, "decode": 1}

        records = _records(out)
        for i, name in ((0, "sign0.png"), (2, "sign1.png"), (4, "sign2.png")):
            rec = records[f"uid-{i}"]
            assert [e["text"] for e in rec["metadata"]["entries"]] == [WORDS[name]]
            assert rec["source_caption"] == f"alt text {i}" and rec["url"] == f"{server.url}/{name}"
            assert rec["captions"][6 + 4]["text"].startswith(f'alt text {i}. The image contains the text "{WORDS[name]}"')

        # export to the published parquet shape ...
        pdir = tmp_path / "parquet"
        r = CliRunner().invoke(app, ["export", "blip3-ocr", str(out), str(pdir)])
        assert r.exit_code == 0, r.output
        table = pq.read_table(pdir / "part-00000.parquet")
        assert table.column_names == ["uid", "url", "captions", "metadata"] and table.num_rows == 3
        exported = {row["uid"]: row for row in table.to_pylist()}
        assert json.loads(exported["uid-0"]["captions"]) == records["uid-0"]["captions"]

        # ... and import it back as an input: same URLs, same uids, same OCR
        again = tmp_path / "again"
        r = CliRunner().invoke(app, ["ocr", str(pdir / "part-00000.parquet"), str(again), "--workers", "1",
                                     "--db", str(db), "--source", "web-again"])
        assert r.exit_code == 0, r.output
    re_records = _records(again)
    assert set(re_records) == {"uid-0", "uid-2", "uid-4"}
    for uid, rec in re_records.items():
        assert rec["metadata"] == json.loads(exported[uid]["metadata"])
        assert rec["captions"][:6] == json.loads(exported[uid]["captions"])[:6]  # no alt text in that shape
