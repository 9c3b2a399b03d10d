"""Input kinds: detection, stable order, safe unique keys, tar offsets, img2dataset failures."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip3.core.errors import UserError
from blip3.core.keys import is_safe_key
from blip3.datagen.inputs import SampleRef, detect_format, iter_refs, iter_samples, load_sample
from tests.ocr_fixtures import jpeg_bytes, png_bytes, text_image


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_folder_recursive_sorted_with_captions_and_safe_unique_keys(tmp_path):
    img = png_bytes(text_image())
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ["b.png", "a.png", "a.jpg", "sub/a.png", "sub/deeper/café ☕.png", "x..y.png", "notes.md"]:
        (tmp_path / name).write_bytes(img)
    (tmp_path / "a.txt").write_text("alt text of a\n")
    refs = list(iter_refs(tmp_path))
    assert detect_format(tmp_path) == "folder"
    assert [r.meta["path"] for r in refs] == ["a.jpg", "a.png", "b.png", "sub/a.png", "sub/deeper/café ☕.png", "x..y.png"]
    keys = [r.key for r in refs]
    assert keys[:3] == ["a", "a_1", "b"]  # duplicate stems rewritten deterministically
    assert all(is_safe_key(k) for k in keys) and len(set(keys)) == len(keys)
    assert refs[0].source_caption == "alt text of a" and refs[2].source_caption is None
    assert keys == [r.key for r in iter_refs(tmp_path)]  # stable
    sample = load_sample(SampleRef.from_json(refs[1].to_json()))
    assert sample.image == img and sample.ext == "png"


def test_webdataset_brace_pattern_keys_offsets_and_captions(tmp_path):
    img0, img1 = jpeg_bytes(text_image("ZERO")), png_bytes(text_image("ONE"))
    _tar(tmp_path / "s-000.tar", [
        ("k0.jpg", img0), ("k0.txt", b"caption zero"), ("k0.json", json.dumps({"uid": "u0", "url": "http://x/0"}).encode()),
        ("../evil.png", img1), ("dir/k1.png", img1), ("nometa.txt", b"only text"),
    ])
    _tar(tmp_path / "s-001.tar", [("k0.jpg", img0)])  # same key in the next shard
    pattern = str(tmp_path / "s-{000..001}.tar")
    assert detect_format(pattern) == "webdataset"
    samples = list(iter_samples(pattern))
    keys = [s.key for s in samples]
    assert keys[0] == "k0" and keys[-1] == "k0_1"
    assert all(is_safe_key(k) and ".." not in k and "/" not in k for k in keys)
    assert samples[0].image == img0 and samples[0].source_caption == "caption zero"
    assert (samples[0].uid, samples[0].url) == ("u0", "http://x/0")
    assert samples[1].image == img1 and samples[2].image == img1
    assert samples[3].error.startswith("no_image:") and samples[3].image == b""
    assert detect_format(tmp_path) == "webdataset"
    with pytest.raises(UserError, match="not found"):
        list(iter_refs(str(tmp_path / "s-{000..002}.tar")))


def test_img2dataset_folder_failures_become_failed_samples(tmp_path):
    img = jpeg_bytes(text_image())
    _tar(tmp_path / "00000.tar", [("000000000.jpg", img), ("000000000.txt", b"cap"), ("000000002.jpg", img)])
    rows = [
        {"key": "000000002", "url": "http://h/2", "caption": "two", "status": "success", "error_message": None, "uid": "u2"},
        {"key": "000000001", "url": "http://h/1", "caption": None, "status": "failed_to_download",
         "error_message": "HTTP Error 404: Not Found", "uid": "u1"},
        {"key": "000000000", "url": "http://h/0", "caption": "zero", "status": "success", "error_message": None, "uid": "u0"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    assert detect_format(tmp_path) == "img2dataset"
    refs = list(iter_refs(tmp_path))
    assert [r.key for r in refs] == ["000000000", "000000001", "000000002"]  # input order, not completion order
    assert refs[1].error == "download: HTTP Error 404: Not Found" and refs[1].url == "http://h/1"
    assert refs[0].uid == "u0" and refs[0].source_caption == "zero"
    assert load_sample(refs[2]).image == img


def test_detection_errors_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        detect_format(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(UserError, match="--input-format"):
        detect_format(tmp_path / "x.bin")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match="url"):
        detect_format(tmp_path / "t.parquet")
    pq.write_table(pa.table({"uid": ["1"], "url": ["u"], "captions": ["[]"], "metadata": ["{}"]}), tmp_path / "o.parquet")
    assert detect_format(tmp_path / "o.parquet") == "blip3-ocr"
    with pytest.raises(UserError, match="unknown input format"):
        list(iter_refs(tmp_path, "zip"))


def test_our_own_caption_shards_as_input_keep_the_original_alt_text(tmp_path):
    record = {"uid": "u", "captions": [{"text": "The image contains no text."}], "generator": {"name": "ocr"},
              "source_caption": "the original alt text"}
    _tar(tmp_path / "00000.tar", [("k.jpg", jpeg_bytes(text_image())), ("k.txt", b"The image contains no text."),
                                   ("k.json", json.dumps(record).encode())])
    (sample,) = iter_samples(tmp_path / "00000.tar")
    assert sample.source_caption == "the original alt text" and sample.uid == "u"


def test_url_lists_are_checked_before_any_download(tmp_path):
    no_url = tmp_path / "list.csv"
    no_url.write_text("link,caption\nhttp://x/a.jpg,a\n")
    with pytest.raises(UserError, match="no `url` column"):
        next(iter_refs(no_url))
    with pytest.raises(UserError, match="not found"):
        next(iter_refs(tmp_path / "missing.csv", "urls"))
    broken = tmp_path / "list.jsonl"
    broken.write_text('{"url": "http://127.0.0.1:9/a.jpg"}\n{"url": \n')
    with pytest.raises(UserError, match="cannot read the URL list"):
        list(iter_refs(broken))


def test_url_lists_are_read_row_by_row_in_every_format(tmp_path):
    """parquet, CSV, TSV and JSONL lists give the same refs (keys = row numbers, url/caption/uid);
    nothing is fetched while enumerating (the server below does not exist)."""
    import polars as pl

    rows = {"url": ["http://127.0.0.1:9/a.jpg", "https://127.0.0.1:9/b.png", "data:,x"],
            "caption": ["alt, with comma", None, "c"], "uid": ["1", "2", "3"]}
    pl.DataFrame(rows).write_parquet(tmp_path / "l.parquet")
    pl.DataFrame(rows).write_csv(tmp_path / "l.csv")
    pl.DataFrame(rows).write_csv(tmp_path / "l.tsv", separator="\t")
    pl.DataFrame(rows).write_ndjson(tmp_path / "l.jsonl")
    for name in ("l.parquet", "l.csv", "l.tsv", "l.jsonl"):
        refs = list(iter_refs(tmp_path / name))
        assert [r.key for r in refs] == ["000000000", "000000001", "000000002"], name
        assert [r.url for r in refs] == rows["url"] and [r.uid for r in refs] == rows["uid"], name
        assert [r.source_caption for r in refs] == ["alt, with comma", None, "c"], name
        assert [r.locator for r in refs] == [["url", rows["url"][0]], ["url", rows["url"][1]], ["none"]], name
        assert refs[2].error == "url_scheme: only http(s) URLs are fetched, not data://", name


def test_webdataset_scan_opens_each_tar_once(tmp_path, monkeypatch):
    """Reading the json/txt members of a tar's samples goes through one open file, not one per member."""
    import builtins

    import blip3.core.storage as storage

    img = png_bytes(text_image("A", size=(40, 20)))
    members = []
    for i in range(4):
        members += [(f"s{i}.png", img), (f"s{i}.txt", f"cap {i}".encode()), (f"s{i}.json", json.dumps({"uid": str(i)}).encode())]
    _tar(tmp_path / "a.tar", members)
    opened: list[str] = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(storage, "open", counting_open, raising=False)
    refs = list(iter_refs(tmp_path / "a.tar"))
    assert [(r.uid, r.source_caption) for r in refs] == [(str(i), f"cap {i}") for i in range(4)]
    assert opened == [str(tmp_path / "a.tar")]
    assert load_sample(refs[2]).image == img  # load_sample reads through the same helper


# -- nothing lost silently ------------------------------------------------------------------------
def test_folder_with_tars_and_loose_images_is_refused_naming_the_flag(tmp_path):
    img = png_bytes(text_image())
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(img)
    _tar(tmp_path / "000000.tar", [("k.png", img)])
    with pytest.raises(UserError, match="--input-format folder") as e:
        detect_format(tmp_path)
    assert "\n" not in str(e.value)
    assert len(list(iter_refs(tmp_path, "folder"))) == 3  # naming the kind still works
    assert len(list(iter_refs(tmp_path, "webdataset"))) == 1


def test_output_inside_a_folder_input_is_refused(tmp_path):
    from blip3.datagen.inputs import check_output_outside_input

    (tmp_path / "in").mkdir()
    for out in (tmp_path / "in", tmp_path / "in" / "shards"):
        with pytest.raises(UserError, match="inside the input folder"):
            check_output_outside_input(tmp_path / "in", out)
    check_output_outside_input(tmp_path / "in", tmp_path / "out")  # beside it: fine
    check_output_outside_input(tmp_path / "in", tmp_path)  # input inside the output: fine


def test_dangling_symlink_is_a_failed_row(tmp_path):
    img = png_bytes(text_image())
    (tmp_path / "a.png").write_bytes(img)
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    refs = list(iter_refs(tmp_path))
    assert [r.key for r in refs] == ["a", "b"]
    assert refs[0].error is None
    assert refs[1].error.startswith("dangling_symlink: b.png points at") and refs[1].locator == ["none"]


def test_every_image_member_of_a_tar_gets_a_row(tmp_path):
    """7 image members: a repeated key, two images under one key and a hard link -> 7 rows."""
    img0, img1 = png_bytes(text_image("A")), png_bytes(text_image("B"))
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", img0), ("a.png", img1), ("b.jpg", img0), ("b.png", img1), ("c.png", img0)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d.png")
        link.type, link.linkname = tarfile.LNKTYPE, "a.png"
        tar.addfile(link)
        info = tarfile.TarInfo("e.png")
        info.size = len(img1)
        tar.addfile(info, io.BytesIO(img1))
    refs = list(iter_refs(path))
    assert len(refs) == 7
    by_key = {r.key: r for r in refs}
    assert set(by_key) == {"a", "a_1", "b", "b_1", "c", "e", "d"}
    assert load_sample(by_key["a"]).image == img0  # the first of a repeated member is used
    assert by_key["a_1"].error.startswith("duplicate_member: 'a.png'")
    assert by_key["b"].ext == "jpg" and by_key["b_1"].error.startswith("duplicate_member: 'b.png'")
    assert by_key["d"].error == "tar_link: 'd.png' is a hard link to 'a.png'; links are not read as images"
    assert by_key["c"].error is None and by_key["e"].error is None


def test_a_dotted_image_name_under_another_key_is_a_failed_row_not_lost(tmp_path):
    """`a.b.jpg` is key `a` (extension `b.jpg`, the webdataset way), beside `a.jpg`: it becomes a
    failed row naming it, and the tar counts (what plans are cut from) agree with the listing."""
    from blip3.datagen.inputs import TarSource, count_tar

    img = png_bytes(text_image("A"))
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "a.b.jpg", "b.jpg", "c.d.png"):
            info = tarfile.TarInfo(name)
            info.size = len(img)
            tar.addfile(info, io.BytesIO(img))
    refs = list(iter_refs(path))
    by_key = {r.key: r for r in refs}
    assert sorted(by_key) == ["a", "a_1", "b", "c"] and count_tar(TarSource(str(path)), 10).refs == 4
    assert by_key["a"].error is None and by_key["b"].error is None
    assert by_key["a_1"].error.startswith("duplicate_member: 'a.b.jpg' is a second image under key 'a'")
    assert by_key["c"].error is None and by_key["c"].ext == "png"  # the only image of key `c`: used
