"""`blip3 model init | generate | info` through the real CLI app on the tiny config."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.model.xgenmm import XGenMM


def test_init_then_generate_with_an_image(tmp_path):
    runner = CliRunner()
    out = tmp_path / "tiny"
    r = runner.invoke(app, ["model", "init", "-o", str(out), "--config", "tiny", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in out.iterdir()}
    assert XGenMM.from_pretrained(out).config.name == "tiny"
    Image.new("RGB", (90, 40), (10, 200, 30)).save(tmp_path / "a.png")
    r = runner.invoke(app, ["model", "generate", str(out), "--prompt", "<image> what?", "--image", str(tmp_path / "a.png"),
                            "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.strip()  # the generated text is printed (tests/test_bite_model.py checks it is the model's)
    # two markers, one image: a user error (exit 2), not a traceback
    r = runner.invoke(app, ["model", "generate", str(out), "--prompt", "<image> <image>", "--image", str(tmp_path / "a.png")])
    assert r.exit_code != 0 and "markers" in str(r.exception)
    # a file that is not an image: a user error naming the file, not PIL's traceback
    (tmp_path / "notes.png").write_text("not pixels")
    r = runner.invoke(app, ["model", "generate", str(out), "--prompt", "<image> what?", "--image", str(tmp_path / "notes.png")])
    assert r.exit_code != 0 and "not a readable image" in str(r.exception) and "notes.png" in str(r.exception)


def test_info_counts_the_real_model_on_meta():
    r = CliRunner().invoke(app, ["model", "info", "--config", "phi3-mini"])
    assert r.exit_code == 0, r.output
    assert "109901568" in r.output.replace(",", "")
