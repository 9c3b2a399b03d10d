"""Fetch a URL list through img2dataset, so URL inputs become an img2dataset output folder.

`fetch_urls(list_file, work_dir)` runs `img2dataset.download` into `work_dir` (the job's
`<output>/.download/img2dataset/`) as WebDataset tars with the original bytes (`disable_all_reencoding`:
validation is ours), keeping `caption` and `uid` when the list has them. img2dataset's own failures
(404, timeouts, ...) land in its parquet and become failed samples with a `download:` reason.
A `.complete` marker holding the list's sha256 lets a re-run skip the download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from blip3.core.errors import UserError
from blip3.core.shards import file_sha256

_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
MARKER = ".complete"
#: Columns added to a URL list whose non-http(s) rows were blanked (see `_http_only`).
REFUSED_COL, SOURCE_URL_COL = "blip3_refused", "blip3_source_url"


def list_columns(path: Path) -> list[str]:
    """Column names of a URL list (parquet/csv/tsv/jsonl/json)."""
    import polars as pl

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix in (".csv", ".tsv"):
            return pl.scan_csv(path, separator="\t" if suffix == ".tsv" else ",").collect_schema().names()
        if suffix == ".jsonl":
            return pl.scan_ndjson(path).collect_schema().names()
        if suffix == ".json":
            return pl.read_json(path).columns
    except Exception as e:  # polars raises many kinds for malformed files; the user gets one line
        raise UserError(f"cannot read the URL list: {str(e).splitlines()[0]}", file=path) from e
    raise UserError(f"unsupported URL list type {suffix!r}; one of {', '.join(_FORMATS)}", file=path)


def _run_img2dataset(args: dict, work_dir: Path, timeout_s: float | None) -> None:
    """Run `img2dataset.download(**args)` in a child process.

    img2dataset starts its workers with multiprocessing's `spawn`, which re-imports the caller's
    `__main__`, and it retries some write errors forever; a child process with a time limit keeps
    both away from the job.
    """
    # albumentations (imported by img2dataset) phones home; wandb, imported even with
    # enable_wandb=False, leaves tmp*wandb-* folders in $TMPDIR: keep them in the job's own folder.
    tmp = work_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "TMPDIR": str(tmp)}
    code = "import json, sys\nfrom img2dataset import download\ndownload(**json.loads(sys.argv[1]))\n"
    log_path = work_dir / "img2dataset.log"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise UserError(f"img2dataset did not finish in {timeout_s}s (log: {log_path})", file=args["url_list"]) from e
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"img2dataset failed ({tail[0][:200]}); log: {log_path}", file=args["url_list"])


def _http_only(list_file: Path, work_dir: Path) -> tuple[Path, str]:
    """The list img2dataset may fetch, and its format: only http(s) URLs. img2dataset's urllib also
    opens `file://` (and `ftp://`, `data:`) URLs, so a list naming `file:///etc/passwd` would copy a
    local file into the corpus. When the list has such rows, a copy is written where their `url`
    is empty (img2dataset fails the row without opening anything), the original URL kept in
    `SOURCE_URL_COL` and the reason in `REFUSED_COL`; enumeration records them as failed rows."""
    import polars as pl

    suffix = list_file.suffix.lower()
    frame = _read_list(list_file, suffix)
    url = pl.col("url").cast(pl.Utf8)
    http = url.str.to_lowercase().str.contains(r"^https?://")
    if frame.select(http.fill_null(False).all()).item():
        return list_file, _FORMATS[suffix]
    scheme = url.str.extract(r"^([A-Za-z][A-Za-z0-9+.-]*):", 1).str.to_lowercase()
    frame = frame.with_columns(
        pl.when(http).then(None).otherwise(
            pl.lit("url_scheme: only http(s) URLs are fetched")
            + pl.coalesce(pl.lit(", not ") + scheme + pl.lit("://"), pl.lit(""))).alias(REFUSED_COL),
        url.alias(SOURCE_URL_COL),
        pl.when(http).then(url).otherwise(pl.lit("")).alias("url"),
    )
    safe = work_dir / "urls-http-only.parquet"
    frame.write_parquet(safe)
    return safe, "parquet"


def _read_list(path: Path, suffix: str):
    import polars as pl

    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False)
        if suffix == ".jsonl":
            return pl.read_ndjson(path)
        return pl.read_json(path)
    except Exception as e:  # polars raises many kinds for malformed files; the user gets one line
        raise UserError(f"cannot read the URL list: {str(e).splitlines()[0]}", file=path) from e


@dataclass(frozen=True)
class DownloadOptions:
    """How img2dataset fetches a URL list (`--download-threads/-timeout/-retries`)."""

    threads: int = 16
    timeout: int = 10  # seconds per request
    retries: int = 2  # further attempts per URL after a failed one (a 5xx, a reset, a timeout)

    def check(self) -> None:
        for name, value, least in (("threads", self.threads, 1), ("timeout", self.timeout, 1),
                                   ("retries", self.retries, 0)):
            if value < least:
                raise UserError(f"must be at least {least}", field=f"--download-{name}")


def fetch_urls(list_file: Path, work_dir: Path, options: DownloadOptions = DownloadOptions(), *,
               timeout_s: float | None = None) -> Path:
    """Download the list's images into `work_dir/img2dataset/`; returns that folder."""
    options.check()
    if not list_file.is_file():
        raise UserError("URL list not found", file=list_file)
    columns = list_columns(list_file)
    if "url" not in columns:
        raise UserError("no `url` column", field="url", file=list_file)
    digest = file_sha256(list_file)
    marker = work_dir / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return work_dir / "img2dataset"
    shutil.rmtree(work_dir / "img2dataset", ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    extra = [c for c in ("uid",) if c in columns]
    url_list, input_format = _http_only(list_file, work_dir)
    if url_list != list_file:
        extra += [REFUSED_COL, SOURCE_URL_COL]
    args = dict(
        url_list=str(url_list),
        output_folder=str(work_dir / "img2dataset"),
        input_format=input_format,
        url_col="url",
        caption_col="caption" if "caption" in columns else None,
        save_additional_columns=extra or None,
        output_format="webdataset",
        disable_all_reencoding=True,
        resize_mode="no",
        processes_count=1,
        thread_count=options.threads,
        timeout=options.timeout,
        retries=options.retries,
        number_sample_per_shard=10_000,
        enable_wandb=False,
        # img2dataset's "overwrite" mode deletes its own _tmp folder and then retries forever;
        # a fresh folder (removed below when the list changed) with "incremental" is equivalent.
        incremental_mode="incremental",
    )
    _run_img2dataset(args, work_dir, timeout_s)
    marker.write_text(digest)
    return work_dir / "img2dataset"
