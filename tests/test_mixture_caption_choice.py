"""A mixture source can train on one stored caption variant instead of `.txt`; the xgenmm
pretrain stage uses the paper's: BLIP3-OCR text only (no boxes), the filler "the text" stripped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from blip3.core.errors import UserError
from blip3.mixture.caption_choice import chosen_caption, strip_filler, validate_caption_choice
from tests.model_fixtures import noise_image, tiny_config, tiny_processor  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
WORDS = ["MACK SHOP", "OPEN", "EXIT 4", "SALE", "CAFE", "NO PARKING"]


def test_strip_filler_only_before_quoted_entries():
    assert strip_filler('The image contains the text "MACK SHOP", the text "OPEN".') == (
        'The image contains "MACK SHOP", "OPEN".')
    assert strip_filler("A photo of the text book.") == "A photo of the text book."


@pytest.mark.parametrize(
    "choice, field",
    [({}, "caption"), ({"granularity": 9}, "caption.granularity"), ({"granularity": True}, "caption.granularity"),
     ({"colour": 1}, "caption.colour"), ({"strip_filler": "yes", "granularity": 0}, "caption.strip_filler"),
     ({"strip_filler": True}, "caption")],
)
def test_bad_choices_are_one_clear_error(choice, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        validate_caption_choice(choice, field="caption")


def test_a_sample_without_the_variant_is_an_error():
    record = {"captions": [{"text": "x", "granularity": 4, "include_datacomp_raw_cap": False}]}
    with pytest.raises(UserError, match="k1: 0 caption variants"):
        chosen_caption(record, {"granularity": 0}, key="k1")


def _ocr_shards(out: Path) -> list[str]:
    """Two shards shaped like BLIP3-OCR output (12 variants each, `.txt` = granularity 4 with the
    filler), written with the real caption templates and shard writer."""
    from blip3.core.shards import SampleRow, ShardWriter
    from blip3.datagen.ocr_captions import CaptionStyle, build_captions

    style = CaptionStyle()
    txts = []
    for s in range(2):
        with ShardWriter(out, s, generator={"name": "ocr"}) as w:
            for i in range(6):
                key = f"ocr{s}{i}"
                entries = [{"text": WORDS[(s * 6 + i + j) % len(WORDS)], "bbox": [0.1 * j, 0.2, 0.1 * j + 0.3, 0.5]}
                           for j in range(1 + i % 2)]
                caps = build_captions(entries, f"alt text {i}", style)
                txt = next(c["text"] for c in caps if c["granularity"] == 4 and not c["include_datacomp_raw_cap"])
                txts.append(txt)
                buf = io.BytesIO()
                noise_image(48, 32, seed=i).save(buf, format="JPEG")
                record = {"uid": key, "captions": caps, "metadata": {"entries": entries},
                          "generator": {"name": "ocr", "filler": style.filler}}
                w.add(key, {"jpg": buf.getvalue(), "txt": txt, "json": json.dumps(record)}, SampleRow(key))
    return txts


def test_xgenmm_pretrain_batches_hold_text_only_ocr_captions(tmp_path, tiny_processor):
    from blip3.mixture.build import build_manifest
    from blip3.mixture.loader import MixtureLoader
    from blip3.train.config import load_stage
    from blip3.train.data import BatchStream

    stage = load_stage(REPO / "manifests/xgenmm/pretrain.yaml")
    spec = yaml.safe_load(Path(stage.data.spec).read_text())
    assert spec["weight_by"] == "samples"  # the paper's ratios are sampling ratios
    ocr = next(s for s in spec["sources"] if s["name"] == "blip3-ocr")
    assert ocr["caption"] == {"granularity": 0, "include_datacomp_raw_cap": False, "strip_filler": True}

    txts = _ocr_shards(tmp_path / "ocr")
    assert all("the text" in t and "starts at" in t for t in txts)  # the stored default has both
    inline = {"name": "blip3-ocr", "path": str(tmp_path / "ocr" / "*.tar"), "kind": "caption", "weight": 1.0,
              "caption": ocr["caption"]}
    build_manifest({"name": "t", "seed": 0, "sources": [inline]}, record=False, out=tmp_path / "m.yaml")
    loader = MixtureLoader(tmp_path / "m.yaml", shuffle_buffer=4)  # the choice survives the manifest file
    manifest = loader.manifest
    stream = BatchStream(loader, tiny_processor, stage="pretrain", micro_batch_size=2, seq_len=256, pack=True)
    seen = 0
    for _ in range(3):
        batch = stream.next().inputs
        for row, seg in zip(batch["input_ids"], batch["segment_ids"]):
            for k in seg.unique().tolist():
                if k == 0:
                    continue
                text = tiny_processor.decode(row[seg == k].tolist())
                assert text.startswith("The image contains \""), text
                assert "the text" not in text and "starts at" not in text and "[" not in text, text
                assert "alt text" not in text, text
                seen += 1
    assert seen >= 6
    # `.txt` itself is untouched on disk: other consumers still read the stored default
    raw = MixtureLoader(manifest, shuffle_buffer=4)
    raw.manifest.sources[0].caption = None
    assert raw.take(1)[0]["txt"] in txts
