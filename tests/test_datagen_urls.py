"""URL lists fetched inside the shard tasks, against a real HTTP server on 127.0.0.1 that answers
some URLs with 404, one with 500 then 200, one by dropping the connection once, and one too slowly."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from blip3.core.shards import read_sidecar
from blip3.datagen.fetch import DownloadOptions, fetch_in_order
from blip3.datagen.inputs import SampleRef, load_sample
from blip3.datagen.pipeline import run_job
from blip3.datagen.pipeline import JobOptions
from tests.ocr_fixtures import png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner

SLOW_S = 3  # the slow URL answers after this long; the jobs below wait 1s per attempt


class _Server:
    """Serves `root`; `/flaky*` fails its first request with 500, `/reset*` drops its first
    connection unanswered, `/slow*` answers after SLOW_S, `/to-ftp` redirects to an ftp:// URL and
    `/to-a` to `/a.png`. Counts requests per path."""

    def __init__(self, root: Path):
        self.hits: Counter[str] = Counter()
        hits = self.hits

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                hits[self.path] += 1
                first = hits[self.path] == 1
                if self.path.startswith("/flaky") and first:
                    self.send_error(500, "try again")
                    return
                if self.path.startswith("/reset") and first:
                    self.close_connection = True
                    return
                if self.path in ("/to-ftp", "/to-a"):
                    self.send_response(302)
                    self.send_header("Location", "ftp://127.0.0.1:9/x.png" if self.path == "/to-ftp" else "/a.png")
                    self.end_headers()
                    return
                if self.path.startswith("/slow"):
                    time.sleep(SLOW_S)
                try:
                    super().do_GET()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on the slow URL
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.fixture
def web(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for i, name in enumerate(["a.png", "b.png", "flaky.png", "reset.png", "slow.png", "c.png", "ä b.png"]):
        (www / name).write_bytes(png_bytes(text_image("X" * (i + 1))))
    server = _Server(www)
    yield server
    server.close()


@pytest.mark.slow
def test_url_list_is_fetched_inside_the_shard_tasks(ray_local, tmp_path, web):
    names = ["a.png", "missing.png", "flaky.png", "reset.png", "slow.png", "b.png", "gone.png", "c.png"]
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption,uid\n" + "".join(f"{web.url}/{n},alt {i},u{i}\n" for i, n in enumerate(names))
                    + "file:///etc/passwd,alt 8,u8\n")
    options = DownloadOptions(threads=3, timeout=1, retries=1)

    def job(out: Path):
        return run_job(urls, out, SizeCaptioner, JobOptions(workers=1, shard_size=4, register=False, download=options))

    out = tmp_path / "out"
    result = job(out)
    assert (result.shards_total, result.samples, result.successes) == (3, 9, 5)
    rows = {r["uid"]: r for t in sorted(out.glob("*.parquet")) for r in read_sidecar(t).to_pylist()}
    failed = {uid: r["error_message"] for uid, r in rows.items() if r["status"] == "failed"}
    assert failed == {
        "u1": "download: HTTP Error 404: File not found",
        "u4": "download: timeout: no answer within 1s",
        "u6": "download: HTTP Error 404: File not found",
        "u8": "url_scheme: only http(s) URLs are fetched, not file://",
    }
    assert rows["u2"]["status"] == rows["u3"]["status"] == "success"  # a 500 and a dropped connection, retried
    assert rows["u0"]["url"] == f"{web.url}/a.png" and rows["u8"]["url"] == "file:///etc/passwd"
    assert result.failure_reasons == {"download": 3, "url_scheme": 1}
    # the sample -> shard assignment follows the list's row order, keys are the row numbers
    assert [r["key"] for r in read_sidecar(out / "00001.parquet").to_pylist()] == [f"{i:09d}" for i in range(4, 8)]
    # a 404 is final (asked once), the slow URL is asked 1 + retries times
    assert web.hits["/missing.png"] == 1 and web.hits["/slow.png"] == 2 and web.hits["/flaky.png"] == 2
    # nothing but our shard set in the output: no download folder, no second copy
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not (out / ".download").exists()
    assert all(not p.name.startswith(".") for p in out.iterdir())

    # a re-run skips every finished shard without fetching anything
    before = sum(web.hits.values())
    again = job(out)
    assert (again.shards_skipped, again.shards_written) == (3, 0) and sum(web.hits.values()) == before
    # a second clean run writes the same bytes (the flaky and reset URLs now answer at once)
    clean = tmp_path / "clean"
    job(clean)
    assert _hashes(clean) == _hashes(out) and len(_hashes(out)) == 3


def test_urls_are_encoded_and_redirects_stay_on_http(web, tmp_path):
    """A raw space / non-ASCII path is fetched (percent-encoded); a redirect to http(s) is followed,
    one to another scheme is refused with its reason; a 404 is final, not retried."""

    def fetch(path: str):
        url = f"{web.url}{path}"
        return load_sample(SampleRef(key="k", ext="", locator=["url", url], url=url), DownloadOptions(retries=2))

    www = tmp_path / "www"
    assert fetch("/ä b.png").image == (www / "ä b.png").read_bytes()
    assert fetch("/to-a").image == (www / "a.png").read_bytes()
    refused = fetch("/to-ftp")
    assert refused.image == b"" and refused.error.startswith("download: HTTP Error 302: redirect to a non-http(s) URL")
    assert fetch("/nothing.png").error == "download: HTTP Error 404: File not found"
    assert web.hits["/nothing.png"] == 1 and web.hits["/to-ftp"] == 1


def test_fetch_in_order_keeps_input_order_with_a_bounded_window():
    """Results come back in input order whatever finishes first, and at most 2 * threads items are
    pulled from the input ahead of the consumer (a shard's images are not all held at once)."""
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield i

    def work(i: int) -> int:
        time.sleep(0.01 * (i % 3))
        return i * i

    it = fetch_in_order(items(), work, threads=2)
    assert next(it) == 0 and len(pulled) <= 4
    assert list(it) == [i * i for i in range(1, 20)]


class _SizedBodies(http.server.BaseHTTPRequestHandler):
    """`/N` answers N bytes with a Content-Length; `/N?stream` the same bytes without one, ended by
    closing the connection (a server that does not say how much it sends)."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 (http.server's name)
        path, _, query = self.path.lstrip("/").partition("?")
        body = bytes(i % 251 for i in range(int(path)))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if query != "stream":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_download_cap_takes_exactly_the_cap_and_refuses_one_byte_more(monkeypatch):
    """A body of exactly the cap is fetched whole; cap + 1 is `too_large`, never cut to the cap and
    accepted; with or without a Content-Length (real HTTP on 127.0.0.1)."""
    from blip3.datagen import fetch

    cap = 4096
    monkeypatch.setattr(fetch, "MAX_IMAGE_BYTES", cap)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SizedBodies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for query in ("", "?stream"):
            whole = fetch.fetch_url(f"{base}/{cap}{query}", DownloadOptions(retries=0))
            assert whole == bytes(i % 251 for i in range(cap))
            with pytest.raises(fetch.FetchError, match=f"^too_large: more than {cap} bytes$"):
                fetch.fetch_url(f"{base}/{cap + 1}{query}", DownloadOptions(retries=0))
        url = f"{base}/{cap + 1}"
        row = load_sample(SampleRef(key="k", ext="", locator=["url", url], url=url), DownloadOptions(retries=0))
        assert row.image == b"" and row.error == f"download: too_large: more than {cap} bytes"
    finally:
        server.shutdown()
        server.server_close()
