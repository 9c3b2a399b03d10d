"""`blip3 audit`: contact sheet with boxes drawn, histograms, and the page rendered in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.datagen.audit import OBJECT_COLOR, OCR_COLOR, _Card, render_card_image
from blip3.mixture.tiny_sources import draw_scene
from tests.mixture_fixtures import tiny_sources  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory, tiny_sources):  # noqa: F811
    out = tmp_path_factory.mktemp("audit")
    pattern = str(Path(tiny_sources["caption-ocr"]).parent / "caption-{ocr,grounding}")
    r = CliRunner().invoke(app, ["audit", pattern, "-o", str(out), "-n", "16", "--seed", "1"])
    assert r.exit_code == 0, r.output
    return out


def test_sheet_lists_sampled_images_with_captions_and_histograms(audit_dir):
    page = (audit_dir / "index.html").read_text()
    imgs = re.findall(r'<img src="(images/\d+\.jpg)"', page)
    assert len(imgs) == 16 and all((audit_dir / p).is_file() for p in imgs)
    assert "96 written (16 shown below)" in page
    assert page.count('class="card"') == 16 and "The image contains" in page
    for name in ("caption_lengths.png", "boxes_per_image.png", "confidence.png"):
        im = Image.open(audit_dir / name)
        assert im.size[0] > 300 and len(set(im.convert("RGB").getdata())) > 20
        assert f'src="{name}"' in page


def test_failed_samples_are_listed_with_their_reason(audit_dir, tiny_sources):  # noqa: F811
    import pyarrow.parquet as pq

    failed = [r for name in ("caption-ocr", "caption-grounding")
              for p in sorted(Path(tiny_sources[name]).glob("*.parquet"))
              for r in pq.read_table(p).to_pylist() if r["status"] != "success"]
    assert failed  # the fixture has decode and too_large failures
    page = (audit_dir / "index.html").read_text()
    assert f"{96 + len(failed)} input samples: 96 written" in page and f"Failed samples ({len(failed)})" in page
    section = page.split('<section id="failed">', 1)[1]
    for r in failed:
        assert f"<td>{r['key']}</td><td>{r['error_message']}</td>" in section


def _count_color(img: Image.Image, color) -> int:
    return sum(1 for px in img.getdata() if all(abs(a - b) < 30 for a, b in zip(px, color)))


def test_boxes_are_drawn_where_the_coordinates_say():
    import random

    jpg = draw_scene(random.Random(2), (96, 64)).jpg  # black and yellow: neither box colour
    plain = render_card_image(_Card("k", "s", "", jpg, [], []))
    drawn = render_card_image(_Card(
        "k", "s", "", jpg,
        [{"text": "A", "bbox": [0.1, 0.1, 0.5, 0.5], "confidence": 0.9}],
        [{"label": "dog", "bbox": [0.5, 0.5, 0.9, 0.9], "score": 0.8}],
    ))
    assert plain.size == drawn.size == (320, 213)
    assert _count_color(drawn, OCR_COLOR) > _count_color(plain, OCR_COLOR) + 100
    assert _count_color(drawn, OBJECT_COLOR) > _count_color(plain, OBJECT_COLOR) + 100
    # the OCR box's top-left corner is at (0.1, 0.1) of the thumbnail
    x, y = round(0.1 * 320), round(0.1 * 213)
    assert any(all(abs(a - b) < 30 for a, b in zip(drawn.getpixel((x + dx, y + dy)), OCR_COLOR))
               for dx in range(-1, 2) for dy in range(-1, 2))
    assert render_card_image(_Card("k", "s", "", b"not an image", [], [])) is None


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; `make test` installs it)")
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_sheet_renders_its_images_in_chromium(audit_dir, tmp_path):
    url = (audit_dir / "index.html").resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert loaded.group(1) == loaded.group(2) == "19"  # 16 thumbnails + 3 histograms

    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,900", url], tmp_path)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 900) and len(set(img.getdata())) > 500  # pictures, not a blank page

    broken = tmp_path / "broken"
    shutil.copytree(audit_dir, broken)
    (broken / "images" / "0003.jpg").unlink()
    dom = _chromium(["--dump-dom", (broken / "index.html").as_uri()], tmp_path).stdout
    assert 'data-images-loaded="18/19"' in dom  # the check does fail when an image is missing


#: Appended to a copy of the page: writes the rendered positions into the DOM for --dump-dom.
_LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
  document.body.dataset.layout = JSON.stringify({
    page: document.documentElement.scrollWidth,
    cards: Array.from(document.querySelectorAll(".card")).map(box),
    plots: Array.from(document.querySelectorAll(".plot")).map(box),
    sheet: box(document.querySelector(".sheet")), failed: box(document.getElementById("failed")),
  });
});
</script>"""


@pytest.mark.browser
def test_layout_at_1400_px_by_element_positions(audit_dir, tmp_path):
    import html
    import json

    probe = tmp_path / "page"
    shutil.copytree(audit_dir, probe)
    index = probe / "index.html"
    index.write_text(index.read_text().replace("</body>", _LAYOUT_PROBE + "</body>"))
    dom = _chromium(["--window-size=1400,900", "--dump-dom", index.as_uri()], tmp_path).stdout
    layout = json.loads(html.unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))
    assert layout["page"] <= 1400  # no horizontal scrolling
    cards = layout["cards"]
    first_row = [c for c in cards if abs(c[1] - cards[0][1]) < 1]
    assert len(first_row) >= 4  # a grid of columns, not one long column
    assert all(c[2] <= 1400 and c[0] >= 0 for c in cards)
    for i, a in enumerate(cards):  # no two cards overlap
        for b in cards[i + 1:]:
            assert a[2] <= b[0] + 0.5 or b[2] <= a[0] + 0.5 or a[3] <= b[1] + 0.5 or b[3] <= a[1] + 0.5
    assert all(p[3] <= layout["sheet"][1] + 0.5 for p in layout["plots"])  # histograms above the sheet
    assert layout["failed"][1] >= layout["sheet"][3] - 0.5  # failures listed after the sheet
    shot = tmp_path / "shot-1400.png"
    _chromium([f"--screenshot={shot}", "--window-size=1400,900", (audit_dir / "index.html").as_uri()], tmp_path)
    assert Image.open(shot).size == (1400, 900)


def test_polygons_follow_the_records_frame_when_the_stored_image_is_larger():
    """Polygons are pixels of the image the engine saw (json width); the thumbnail is rescaled."""
    import io

    img = Image.new("RGB", (192, 128), (255, 255, 255))  # stored at 2x the annotated 96x64 frame
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    entry = {"text": "A", "bbox": [0.25, 0.25, 0.75, 0.75], "polygon": [[24, 16], [72, 16], [72, 48], [24, 48]]}
    drawn = render_card_image(_Card("k", "s", "", buf.getvalue(), [entry], [], frame_width=96))
    # the polygon's left edge is at 24/96 of the width = x 80 in the 320-wide thumbnail
    column = [drawn.getpixel((80, y)) for y in range(60, 150)]
    assert sum(1 for px in column if all(abs(a - b) < 30 for a, b in zip(px, OCR_COLOR))) > 40


def test_audit_of_a_real_ocr_annotation(tmp_path):
    """The real OCR engine reads a rendered sign; the sheet shows its text and draws its box."""
    import io

    import matplotlib
    from PIL import ImageDraw, ImageFont

    from blip3.core.shards import SampleRow, ShardWriter
    from blip3.datagen.inputs import InputSample
    from blip3.datagen.ocr import OcrConfig

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans-Bold.ttf"), 48)
    img = Image.new("RGB", (480, 200), (255, 255, 255))
    ImageDraw.Draw(img).text((60, 70), "MACK SHOP", font=font, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ocr = OcrConfig()()
    ocr.load()
    ann = ocr.annotate(img, InputSample(key="sign", image=buf.getvalue(), ext="png", uid="sign", url=None,
                                        source_caption=None, meta={}))
    assert any("MACK" in e["text"] for e in ann.metadata["entries"])
    record = {"width": 480, "height": 200, "captions": ann.captions, "metadata": ann.metadata}
    with ShardWriter(tmp_path / "shards", 0) as w:
        w.add("sign", {"png": buf.getvalue(), "txt": ann.default_caption, "json": record},
              SampleRow("sign", n_ocr=ann.n_ocr))
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "shards"), "-o", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "audit" / "index.html").read_text()
    assert "MACK" in page and 'class="ocr"' in page
    thumb = Image.open(tmp_path / "audit" / "images" / "0000.jpg").convert("RGB")
    x1, y1, x2, y2 = ann.metadata["entries"][0]["bbox"]
    edge = [thumb.getpixel((round(x1 * 320) + dx, round((y1 + y2) / 2 * thumb.height))) for dx in (-1, 0, 1)]
    assert any(px[0] > 150 and px[1] < 100 and px[2] < 100 for px in edge)  # red box edge at the text's left


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), OBJECT_COLOR, OCR_COLOR])
def test_boxes_and_labels_stand_out_on_any_background(background):
    import io

    from blip3.datagen.audit import HALO_COLOR

    buf = io.BytesIO()
    Image.new("RGB", (320, 200), background).save(buf, format="PNG")
    drawn = render_card_image(_Card("k", "s", "", buf.getvalue(), [{"bbox": [0.1, 0.1, 0.4, 0.4]}],
                                    [{"label": "dog", "bbox": [0.5, 0.5, 0.9, 0.9], "score": 0.8}]))
    # along each box edge there is a colour far from the background: the halo or the line itself
    for x, y0, y1 in ((32, 20, 80), (160, 100, 180)):
        edge = [drawn.getpixel((x + dx, y)) for dx in range(-2, 4) for y in range(y0 + 5, y1 - 5)]
        assert max(sum(abs(a - b) for a, b in zip(px, background)) for px in edge) > 250
    # the label: white text on a filled box of the object colour, above the box
    label = [drawn.getpixel((x, y)) for x in range(161, 200) for y in range(84, 98)]
    assert _count_color_list(label, HALO_COLOR) > 10 and _count_color_list(label, OBJECT_COLOR) > 100


def _count_color_list(pixels, color) -> int:
    return sum(1 for px in pixels if all(abs(a - b) < 30 for a, b in zip(px, color)))


def test_the_audit_lives_with_the_caption_shards_it_reads():
    """It audits datagen's caption shards, not mixtures: datagen owns it and its command."""
    import importlib

    import typer

    from blip3.datagen import audit_commands

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("blip3.mixture.audit")
    probe = typer.Typer()
    audit_commands.register(probe)
    assert [c.callback.__module__ for c in probe.registered_commands] == ["blip3.datagen.audit_commands"]
