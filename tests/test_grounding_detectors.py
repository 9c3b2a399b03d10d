"""Post-filter (area, per-label NMS, cap), option validation and weight lookup errors."""

import pytest

from blip3.core.errors import MissingWeightsError, UserError
from blip3.datagen.detectors import DetectionLimits, filter_objects, iou, nms_per_label
from blip3.datagen.detectors_gdino import ENV_VAR, HF_REPO, _chunk_tags, resolve_grounding_dino
from blip3.datagen.grounding import make_config
from blip3.datagen.grounding_captions import GroundedObject as O
from blip3.datagen.tags_clip import resolve_clip_model


def test_iou():
    assert iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert iou((0, 0, 0.4, 0.4), (0.2, 0, 0.6, 0.4)) == pytest.approx(1 / 3)


def test_nms_is_per_label():
    a = O("dog", (0.0, 0.0, 0.4, 0.4), 0.9)
    b = O("dog", (0.02, 0.0, 0.42, 0.4), 0.8)  # IoU ~0.9 with a
    c = O("cat", (0.02, 0.0, 0.42, 0.4), 0.7)  # same box, other label: kept
    d = O("dog", (0.6, 0.6, 1.0, 1.0), 0.5)  # far away: kept
    assert nms_per_label([b, c, d, a], 0.5) == [a, c, d]


def test_filter_area_nms_cap():
    objs = [O(f"t{i}", (0.0, 0.0, 0.1 + i / 100, 0.1), 0.1 * i) for i in range(1, 8)]
    tiny = O("speck", (0.5, 0.5, 0.51, 0.51), 0.99)  # area 1e-4 < 5e-4
    flat = O("line", (0.1, 0.5, 0.9, 0.5), 0.99)  # zero area
    out = filter_objects(objs + [tiny, flat], DetectionLimits(max_objects=3))
    assert [o.label for o in out] == ["t7", "t6", "t5"]
    dup = [O("dog", (0, 0, 0.5, 0.5), 0.9), O("dog", (0, 0, 0.5, 0.5), 0.8)]
    assert len(filter_objects(dup, DetectionLimits())) == 1
    assert len(filter_objects(dup, DetectionLimits(nms_iou=None))) == 2


@pytest.mark.parametrize(
    "limits, flag",
    [
        (DetectionLimits(box_threshold=1.5), "--box-threshold"),
        (DetectionLimits(text_threshold=-0.1), "--text-threshold"),
        (DetectionLimits(nms_iou=0.0), "--nms-iou"),
        (DetectionLimits(min_area=1.0), "--min-area"),
        (DetectionLimits(max_objects=0), "--max-objects"),
    ],
)
def test_bad_limits_name_the_option(limits, flag, tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(UserError, match=flag):
        make_config(detector="annotations", annotations=ann, limits=limits)


def test_option_combinations(tmp_path):
    with pytest.raises(UserError, match="--detector"):
        make_config(detector="yolo")
    with pytest.raises(UserError, match="--tags"):
        make_config(tags="ram")
    with pytest.raises(UserError, match="needs --annotations"):
        make_config(detector="annotations")
    with pytest.raises(UserError, match="needs --vocab"):
        make_config(tags="vocab", model=tmp_path)
    with pytest.raises(UserError, match="--caption-format"):
        make_config(caption_format="json")
    with pytest.raises(UserError, match="groundingdino-py is not installed|groundingdino-py backend"):
        make_config(detector="groundingdino-py")


def test_missing_grounding_dino_names_flag_env_and_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(MissingWeightsError) as e:
        resolve_grounding_dino(None)
    msg = str(e.value)
    assert "--model" in msg and ENV_VAR in msg and HF_REPO in msg
    with pytest.raises(MissingWeightsError, match="--model"):
        resolve_grounding_dino(tmp_path / "nothing")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nothing"))
    with pytest.raises(MissingWeightsError, match=ENV_VAR):
        resolve_grounding_dino(None)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "m"))
    assert resolve_grounding_dino(None) == tmp_path / "m"


def test_missing_clip_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("BLIP3_CLIP_MODEL", raising=False)
    with pytest.raises(MissingWeightsError, match="--clip-model DIR or set \\$BLIP3_CLIP_MODEL"):
        resolve_clip_model(None)
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="no CLIP weights"):
        resolve_clip_model(tmp_path)


def test_prompt_chunks_respect_token_budget():
    tags = [f"tag{i}" for i in range(200)]
    chunks = _chunk_tags(tags, lambda t: 2)  # 3 tokens per tag with its "."
    assert [len(c) for c in chunks] == [83, 83, 34]
    assert sum(chunks, []) == tags


def test_center_boxes_become_clamped_corners():
    from blip3.datagen.detectors_gdino import _corners

    assert _corners(0.5, 0.5, 1.2, 0.2) == (0.0, 0.4, 1.0, 0.6)
    assert _corners(0.25, 0.75, 0.1, 0.1) == (0.2, 0.7, 0.3, 0.8)
