"""One home for reading tar members and for what counts as an image member (core.shards), and
one check of the shard-verification modes (mixture.manifest): each was written several times."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from blip3.core.errors import UserError
from blip3.core.shards import IMAGE_EXTS, is_image_ext, iter_shard, iter_tar_index, read_members
from blip3.datagen.inputs import iter_refs, load_sample
from blip3.mixture.build import build_manifest
from blip3.mixture.loader import MixtureLoader
from blip3.mixture.manifest import load_manifest, verify_shards
from blip3.mixture.tar_index import decode_sample
from tests.mixture_fixtures import inline, tiny_sources, write_spec  # noqa: F401


def test_read_members_gives_the_bytes_a_streaming_read_gives(tiny_sources):  # noqa: F811
    tar = tiny_sources["interleaved"] / "00000.tar"
    streamed = list(iter_shard(tar))
    with open(tar, "rb") as f:
        indexed = [read_members(f, s) for s in iter_tar_index(tar)]
    assert len(indexed) == len(streamed) > 0
    for raw, sample in zip(indexed, streamed):
        assert raw == {k: v for k, v in sample.items() if not k.startswith("__")}


def test_datagen_reads_an_image_out_of_a_tar_at_its_offset(tiny_sources, tmp_path):  # noqa: F811
    tar = tiny_sources["caption-ocr"] / "00000.tar"
    first = next(iter_shard(tar))
    ref = next(iter_refs(tar, "webdataset"))
    assert ref.locator[0] == "at" and ref.locator[1].url == str(tar.resolve())
    assert load_sample(ref).image == first["jpg"]


def test_one_image_extension_list(tmp_path):
    """datagen once had its own list without `ppm`: a folder of .ppm images read nothing."""
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.ppm")
    refs = list(iter_refs(tmp_path, "folder"))
    assert [r.ext for r in refs] == ["ppm"]
    assert "ppm" in IMAGE_EXTS and is_image_ext("img0.PPM") and not is_image_ext("json")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PPM")
    decoded = decode_sample({"0.ppm": buf.getvalue(), "json": b"{}"}, key="k", source="s", kind="sft", shard="x")
    assert list(decoded["images"]) == ["0.ppm"]


def test_image_extensions_are_defined_once():
    repo = Path(__file__).resolve().parents[1]
    defining = [p.relative_to(repo).as_posix() for pkg in ("core", "datagen", "mixture", "train", "model", "demo")
                for p in (repo / pkg).rglob("*.py") if re.search(r"^\s*IMAGE_EXTS\s*=", p.read_text(), re.M)]
    assert defining == ["core/shards.py"]


def test_every_verify_option_is_checked_the_same_way(tmp_path, tiny_sources):  # noqa: F811
    spec = write_spec(tmp_path / "spec.yaml", inline(tiny_sources, {"sft": 1}))
    m = build_manifest(spec, out=tmp_path / "m.yaml")
    message = re.escape("verify: must be sha256, size or none, got 'bogus'")
    with pytest.raises(UserError, match=message):
        load_manifest(tmp_path / "m.yaml", verify="bogus")
    with pytest.raises(UserError, match=message):
        MixtureLoader(m, verify="bogus")
    with pytest.raises(UserError, match=message):
        verify_shards(m, "bogus")
    with pytest.raises(UserError, match=re.escape("verify: must be sha256 or size, got 'none'")):
        build_manifest(spec, verify="none")


def test_verify_modes_catch_what_they_promise(tmp_path, tiny_sources):  # noqa: F811
    import shutil

    folder = shutil.copytree(tiny_sources["sft"], tmp_path / "sft")
    spec = write_spec(tmp_path / "spec.yaml", [{"name": "sft", "path": str(folder), "kind": "sft", "weight": 1}])
    m = build_manifest(spec)
    tar = folder / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    tar.write_bytes(bytes(data))
    verify_shards(m, "none")
    verify_shards(m, "size")
    with pytest.raises(UserError, match=r"shards\[0\]\.sha256: .*sha256 differs"):
        verify_shards(m, "sha256")
    tar.write_bytes(bytes(data[:-512]))
    with pytest.raises(UserError, match=r"shards\[0\]\.bytes: .*bytes on disk"):
        verify_shards(m, "size")
    tar.unlink()
    with pytest.raises(UserError, match=r"shards\[0\]\.path: .*is missing"):
        verify_shards(m, "size")
