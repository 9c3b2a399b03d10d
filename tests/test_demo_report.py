"""The demo report's training curves and histograms, from metrics files as the trainer writes them."""

from __future__ import annotations

import re
import subprocess

import pytest
from PIL import Image

from blip3.demo.report import ReportInputs, write_report
from blip3.train.metrics import MetricsWriter


def _stage(path, rows):
    w = MetricsWriter(path)
    for step, row in enumerate(rows, 1):
        w.log(step, row)
    w.close()
    return path


@pytest.fixture
def report(tmp_path):
    sft = _stage(tmp_path / "sft", [{"loss": 2.0 - 0.1 * i, "lr": 1e-4 * min(1, i / 3), "tokens_per_s": 900 + i}
                                    for i in range(8)])
    dpo = _stage(tmp_path / "dpo", [{"loss": 0.69 - 0.02 * i, "lr": 5e-6, "tokens_per_s": 400.0,
                                     "margin": 0.05 * i, "reward_acc": min(1.0, 0.5 + 0.1 * i)} for i in range(6)])
    audit = tmp_path / "audit" / "ocr"
    audit.mkdir(parents=True)
    (audit / "index.html").write_text("<html></html>")
    Image.new("RGB", (360, 240), (31, 119, 180)).save(audit / "caption_lengths.png")
    out = tmp_path / "out"
    out.mkdir()
    return write_report(ReportInputs(out, audits={"ocr": audit / "index.html"},
                                     stage_dirs={"sft": sft, "dpo": dpo}))


def test_report_plots_lr_throughput_and_dpo_margins(report):
    page = report.read_text()
    for png, title in (("losses.png", "Training loss"), ("lr.png", "Learning rate"),
                       ("throughput.png", "Throughput"), ("dpo_margin.png", "DPO reward margin"),
                       ("dpo_reward_acc.png", "DPO reward accuracy")):
        assert f'src="{png}"' in page and title in page
        im = Image.open(report.parent / png)
        assert len(set(im.convert("RGB").getdata())) > 20  # a drawn plot, not an empty canvas
    # DPO curves only for the stage that logged them: one panel, narrower than the two-stage plots
    assert Image.open(report.parent / "dpo_margin.png").width < Image.open(report.parent / "lr.png").width
    assert re.search(r'<img class="hist" src="[^"]*caption_lengths\.png"', page)


@pytest.mark.browser
def test_report_renders_its_images_in_chromium(report, tmp_path):
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; `make test` installs it)")
    probe = report.parent / "probe.html"
    probe.write_text(report.read_text().replace("</body>", """<script>window.addEventListener("load", () => {
      const imgs = Array.from(document.images);
      document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
      document.body.dataset.right = Math.max(...imgs.map(i => i.getBoundingClientRect().right));
    });</script></body>"""))
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--window-size=1400,900"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-loaded="6/6"' in dom  # five curves and the histogram
    assert float(re.search(r'data-right="([\d.]+)"', dom).group(1)) <= 1400  # nothing wider than the window
    shot = tmp_path / "report-1400.png"
    subprocess.run(base + [f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    assert Image.open(shot).size == (1400, 900)
