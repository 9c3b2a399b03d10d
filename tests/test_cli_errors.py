"""Bad input and a hostile machine state end in one line and exit 2, never a traceback wall."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from blip3.core.catalog import Catalog
from blip3.core.errors import UserError, describe_exception, environment_error
from blip3.core.yamlio import read_yaml
from tests.core_fixtures import tmpfs

REPO = Path(__file__).resolve().parents[1]


def blip3(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, BLIP3_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "blip3.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error text of a failed command, after checking it is exit 2 and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return " ".join(r.stderr.split())


# -- YAML the user wrote --------------------------------------------------------------------------
def test_yaml_not_utf8_or_too_deep_is_one_line(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.yaml: not UTF-8 text \(byte 9\)"):
        read_yaml(latin)
    deep = tmp_path / "deep.yaml"
    deep.write_text("stage: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(UserError, match=r"deep\.yaml: YAML nested too deeply"):
        read_yaml(deep)
    for path, says in ((latin, "not UTF-8"), (deep, "nested too deeply")):  # through commands reading YAML
        assert says in one_line_error(blip3("train", str(path)))
        assert says in one_line_error(blip3("mix", "build", str(path), "--out", str(tmp_path / "m.yaml"),
                                            "--db", str(tmp_path / "c.duckdb")))


# -- result files -----------------------------------------------------------------------------------
@pytest.fixture
def catalog(tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db):
        pass
    return db


def test_sql_csv_of_nested_columns_names_them(catalog):
    text = one_line_error(blip3("sql", "SELECT [1, 2] AS l, {'a': 1} AS s, 3 AS n", "--format", "csv", "--db", str(catalog)))
    assert "CSV cannot hold nested columns: l (list<l: int32>), s (struct<a: int32>)" in text
    r = blip3("sql", "SELECT [1, 2] AS l", "--format", "json", "--db", str(catalog))
    assert r.returncode == 0 and r.stdout.strip() == '{"l": [1, 2]}'


def test_result_file_on_a_full_disk_or_under_a_file_is_one_line(catalog, tmp_path):
    # /dev/full is a real device that answers every write with ENOSPC.
    for fmt in ("csv", "parquet", "table"):
        text = one_line_error(blip3("sql", "SELECT 1 AS n", "--format", fmt, "--out", "/dev/full", "--db", str(catalog)))
        assert "/dev/full: --out: no space left on the device" in text
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    text = one_line_error(blip3("sql", "SELECT 1", "--format", "csv", "--out", str(a_file / "r.csv"), "--db", str(catalog)))
    assert "the folder to write into does not exist" in text


def test_datagen_output_that_is_a_file_is_one_line(tmp_path):
    from tests.ocr_fixtures import png_bytes, text_image

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(text_image()))
    out = tmp_path / "out"
    out.write_text("not a folder")
    text = one_line_error(blip3("ocr", str(tmp_path / "imgs"), str(out), "--workers", "1"))
    assert f"{out}: exists and is not a folder" in text


def test_audit_of_a_file_that_is_not_a_tar_is_one_line(tmp_path):
    bogus = tmp_path / "notes.tar"
    bogus.write_bytes(b"this is not a tar archive at all" * 40)
    text = one_line_error(blip3("audit", str(bogus), "--out", str(tmp_path / "audit")))
    assert f"{bogus}: not a readable tar" in text


# -- OS errors from anywhere in the stack ------------------------------------------------------------
def test_environment_errors_are_found_through_chains_and_ray_wrappers():
    from ray.exceptions import RayTaskError

    full = OSError(errno.ENOSPC, "No space left on device", "/data/000001.tar")
    wrapped = RayTaskError("write_shard", "Traceback ...", full).as_instanceof_cause()
    assert str(environment_error(wrapped)) == "/data/000001.tar: no space left on the device; free some space and run again"
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("writer failed") from e
    except RuntimeError as chained:
        assert "no space left" in str(environment_error(chained))
    assert environment_error(OSError(errno.ENOENT, "No such file")) is None  # may be a bug: stays loud
    assert environment_error(ValueError("x")) is None


def test_annotate_failures_carry_the_chained_detail():
    class ResizeImgError(Exception):
        """Shaped like the OCR engine's resize error: raised bare, its reason only in the chained cause."""

    try:
        try:
            raise ValueError("resize_w or resize_h is less than or equal to 0")
        except ValueError as exc:
            raise ResizeImgError() from exc
    except ResizeImgError as e:
        assert describe_exception(e) == "ResizeImgError: ValueError: resize_w or resize_h is less than or equal to 0"
    assert describe_exception(KeyError("k")) == "KeyError: 'k'"


@pytest.mark.slow
def test_datagen_on_a_really_full_disk_is_one_line(tmp_path):
    """A tiny tmpfs as the output disk (needs mount rights; skipped elsewhere)."""
    import numpy as np
    from PIL import Image

    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        imgs = tmp_path / "imgs"
        imgs.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):  # noise does not compress: 4 x ~75 KB will not fit in 64 KB
            Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(imgs / f"n{i}.png")
        text = one_line_error(blip3("ocr", str(imgs), str(disk / "out"), "--workers", "1", "--shard-size", "2", timeout=600))
        assert f"{disk / 'out'}: no space left on the device" in text


def test_datagen_refuses_ambiguous_inputs_before_any_work(tmp_path):
    from tests.ocr_fixtures import png_bytes, text_image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(png_bytes(text_image()))
    text = one_line_error(blip3("ocr", str(imgs), str(imgs / "out"), "--workers", "1"))
    assert "is inside the input folder" in text and not (imgs / "out").exists()
    with tarfile.open(imgs / "000000.tar", "w"):
        pass
    text = one_line_error(blip3("ocr", str(imgs), str(tmp_path / "out"), "--workers", "1"))
    assert "--input-format folder" in text and not (tmp_path / "out").exists()


def test_output_on_a_read_only_file_system_is_one_line(tmp_path, catalog):
    """Root ignores permission bits, so "unwritable" is a read-only tmpfs (needs mount rights)."""
    from tests.ocr_fixtures import png_bytes, text_image

    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(text_image()))
        text = one_line_error(blip3("ocr", str(tmp_path / "imgs"), str(ro / "out"), "--workers", "1"))
        assert f"{ro / 'out'}: read-only file system" in text
        text = one_line_error(blip3("sql", "SELECT 1", "--format", "csv", "--out", str(ro / "r.csv"), "--db", str(catalog)))
        assert "read-only file system" in text
        src = tmp_path / "src"
        from tests.core_fixtures import write_caption_shard

        write_caption_shard(src, 0, 2)
        text = one_line_error(blip3("catalog", "add", str(src), "--db", str(ro / "c.duckdb")))
        assert "c.duckdb" in text and "Read-only file system" in text


def test_datagen_says_when_part_of_its_output_is_not_in_the_catalog(tmp_path):
    """The job is done but a shard cannot be registered (its sidecar was damaged since): exit 2, named."""
    from blip3.core.shards import shard_paths
    from tests.ocr_fixtures import png_bytes, text_image

    imgs, out = tmp_path / "imgs", tmp_path / "out"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(png_bytes(text_image()))
    coco = tmp_path / "coco.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}')
    args = ["ground", str(imgs), str(out), "--detector", "annotations", "--annotations", str(coco), "--workers", "1"]
    assert blip3(*args, "--db", str(tmp_path / "c.duckdb")).returncode == 0
    tar, parquet, _ = shard_paths(out, 0)
    parquet.write_bytes(b"PAR1 damaged PAR1")
    text = one_line_error(blip3(*args, "--db", str(tmp_path / "fresh.duckdb")))
    assert "1 shard(s) NOT registered" in text and tar.name in text and "catalog add" in text
