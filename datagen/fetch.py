"""URL lists: read lazily as rows, and fetched inside the shard tasks, never in a job-wide step.

A URL list (parquet / CSV / TSV / JSONL / JSON with a `url` column, optional `caption` and `uid`)
is enumerated row by row (`iter_url_rows`: parquet and CSV in record batches, JSONL line by line),
so the driver holds one shard's rows at a time, never the list. Each row becomes a ref whose bytes
are fetched by the actor writing its shard (`fetch_in_order`, a thread pool per shard): no
download-first step, no download folder in the output, no second copy of the corpus.

Why our own small fetcher and not img2dataset's downloader: img2dataset retries every error alike
without a pause, and its urllib opener also opens `file://` / `ftp://` / `data:` URLs (a list naming
`file:///etc/passwd` would copy a local file into the corpus). Here only `http(s)://` URLs are opened
(a redirect elsewhere is refused too), transient errors (5xx, 429, timeouts, connection resets) are
retried with exponential backoff, and a final failure becomes the sample's `download:` reason.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from blip3.core.errors import UserError

_FORMATS = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
#: the columns a URL list contributes to a sample; others are ignored
LIST_COLUMNS = ("url", "caption", "uid")
#: first pause before a retry, doubled on each further one
BACKOFF_S = 0.25
#: a response larger than this is refused (a hostile server must not fill an actor's memory)
MAX_IMAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = "blip3-engine"
_BATCH_ROWS = 4096
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DownloadOptions:
    """How each shard task fetches its URLs (`--download-threads/-timeout/-retries`)."""

    threads: int = 16  # concurrent requests per shard task
    timeout: int = 10  # seconds per request
    retries: int = 2  # further attempts per URL after a transient failure (a 5xx, a reset, a timeout)

    def check(self) -> None:
        for name, value, least in (("threads", self.threads, 1), ("timeout", self.timeout, 1),
                                   ("retries", self.retries, 0)):
            if value < least:
                raise UserError(f"must be at least {least}", field=f"--download-{name}")


# -- the list -----------------------------------------------------------------------------------
def list_columns(path: Path) -> list[str]:
    """Column names of a URL list (parquet/csv/tsv/jsonl/json), read from its head only."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix in (".csv", ".tsv"):
            return list(_csv_reader(path, suffix, None).schema.names)
        if suffix == ".jsonl":
            import polars as pl

            return pl.scan_ndjson(path).collect_schema().names()
        if suffix == ".json":
            import polars as pl

            return pl.read_json(path).columns
    except Exception as e:  # pyarrow/polars raise many kinds for malformed files; the user gets one line
        raise UserError(f"cannot read the URL list: {str(e).splitlines()[0]}", file=path) from e
    raise UserError(f"unsupported URL list type {suffix!r}; one of {', '.join(_FORMATS)}", file=path)


def _csv_reader(path: Path, suffix: str, columns: list[str] | None):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns or []})
    return pcsv.open_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                         convert_options=convert)


def iter_url_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The list's rows in file order, as `{url, caption, uid}` (absent columns None), read lazily.

    Checked first (exists, readable, has a `url` column), so a bad list stops the job before any
    shard is planned."""
    if not path.is_file():
        raise UserError("URL list not found", file=path)
    present = list_columns(path)
    if "url" not in present:
        raise UserError("no `url` column", field="url", file=path)
    columns = [c for c in LIST_COLUMNS if c in present]
    try:
        for batch in _iter_batches(path, path.suffix.lower(), columns):
            for row in batch:
                yield {c: _text(row.get(c)) for c in LIST_COLUMNS}
    except (OSError, ValueError) as e:  # a list malformed past its head (pyarrow's errors are ValueErrors)
        raise UserError(f"cannot read the URL list: {str(e).splitlines()[0]}", file=path) from e


def _iter_batches(path: Path, suffix: str, columns: list[str]) -> Iterator[list[dict[str, Any]]]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            yield batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        for batch in _csv_reader(path, suffix, columns):
            yield batch.to_pylist()
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"line {number}: {e}") from e
                    yield [row if isinstance(row, dict) else {}]
    else:  # a single JSON array has no streaming reader; such lists are small by nature
        import polars as pl

        yield pl.read_json(path).select(columns).to_dicts()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def scheme_error(url: str | None) -> str | None:
    """Why a URL is not fetched (`url_scheme: ...`), or None for an http(s) URL."""
    lowered = (url or "").strip().lower()
    if lowered.startswith(("http://", "https://")):
        return None
    scheme = lowered.split(":", 1)[0] if ":" in lowered else ""
    valid = scheme and scheme[0].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)
    return "url_scheme: only http(s) URLs are fetched" + (f", not {scheme}://" if valid else "")


# -- fetching ------------------------------------------------------------------------------------
class FetchError(Exception):
    """A URL that could not be fetched; `str()` is the reason recorded after `download: `."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib's own handler also follows `ftp://`)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if scheme_error(newurl):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL refused: {newurl[:100]}",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _transient(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code == 429
    return isinstance(e, (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                          http.client.HTTPException))


def _reason(e: BaseException, timeout: int) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP Error {e.code}: {e.reason}"
    cause = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"timeout: no answer within {timeout}s"
    return f"{type(cause).__name__}: {cause}"[:200]


def _ascii_url(url: str) -> str:
    """The URL as a request line can carry it: web alt-text lists hold raw spaces and non-ASCII
    paths (`/ä b.jpg`), which urllib refuses; they are percent-encoded (existing `%xx` kept) and an
    international host name IDNA-encoded."""
    parts = urllib.parse.urlsplit(url.strip())
    netloc = parts.netloc if parts.netloc.isascii() else parts.netloc.encode("idna").decode("ascii")
    safe = "/%:@!$&'()*+,;=~-._?"
    return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=safe),
                                    urllib.parse.quote(parts.query, safe=safe), urllib.parse.quote(parts.fragment, safe=safe)))


def _get(url: str, timeout: int) -> bytes:
    request = urllib.request.Request(_ascii_url(url), headers={"User-Agent": USER_AGENT})
    with _OPENER.open(request, timeout=timeout) as response:
        data = response.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise FetchError(f"too_large: more than {MAX_IMAGE_BYTES} bytes")
    return data


def fetch_url(url: str, options: DownloadOptions = DownloadOptions()) -> bytes:
    """The bytes at an http(s) URL; transient errors retried `options.retries` times with
    exponential backoff. Raises FetchError with the final reason."""
    refused = scheme_error(url)
    if refused:
        raise FetchError(refused)
    for attempt in range(options.retries + 1):
        try:
            return _get(url, options.timeout)
        except FetchError:
            raise
        except ValueError as e:  # a malformed URL (urllib's InvalidURL, a host IDNA cannot encode)
            raise FetchError(f"bad_url: {e}") from None
        except Exception as e:  # noqa: BLE001 (every network error is either retried or recorded)
            if not _transient(e) or attempt == options.retries:
                raise FetchError(_reason(e, options.timeout)) from None
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def fetch_in_order(items: Iterable[T], work: Callable[[T], R], threads: int) -> Iterator[R]:
    """`map(work, items)` on a thread pool, results in input order, at most `2 * threads` pending:
    a shard's downloads overlap while its memory holds a window of images, not the whole shard."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(work, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
