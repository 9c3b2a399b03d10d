"""The model-backed curation stages on tiny real models: the CLIP score (open_clip, built and saved
by the test) against open_clip's own forward pass, semantic dedup on its embeddings, the OCR
detector's text presence, and the one-line error when CLIP weights are missing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.errors import MissingWeightsError
from blip3.datagen.semdedup import kmeans, semantic_pairs
from tests.curate_fixtures import encode, picture
from tests.grounding_fixtures import build_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=1)


def test_clip_score_is_the_datacomp_cosine(clip_dir):
    import open_clip
    import torch

    from blip3.datagen.clip_score import ClipStage

    captions = ["a dog on the grass", "a red car", "two people walking"]
    images = [encode(picture(i, (64, 48))) for i in range(3)] + [b"broken"]
    out = ClipStage(clip_dir, embeddings=True, device="cpu")({"key": list("abcd"), "image": images,
                                                               "caption": captions + ["x"]})
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    with torch.no_grad():
        from blip3.datagen.image_hash import open_image

        img = model.encode_image(torch.stack([preprocess(open_image(b).convert("RGB")) for b in images[:3]]))
        txt = model.encode_text(tok(captions))
    want = torch.nn.functional.cosine_similarity(img, txt).numpy()
    assert np.allclose(out["score.clip"][:3], want, atol=1e-5)
    assert np.isnan(out["score.clip"][3])  # an image that does not decode has no score
    emb = np.stack(out["embedding"][:3])
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_missing_clip_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("BLIP3_CLIP_MODEL", raising=False)
    r = CliRunner().invoke(app, ["curate", "--clip", "--db", str(tmp_path / "c.duckdb")])
    assert isinstance(r.exception, MissingWeightsError)
    assert "--clip needs local CLIP weights" in str(r.exception) and "\n" not in str(r.exception)
    r = CliRunner().invoke(app, ["curate", "--clip-model", str(tmp_path), "--db", str(tmp_path / "c.duckdb")])
    assert isinstance(r.exception, MissingWeightsError) and "no open_clip_config.json" in str(r.exception)


def test_semantic_pairs_within_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    x = np.concatenate([c + 0.01 * rng.normal(size=(1, 16)) for c in centres for _ in range(3)] +
                       [rng.normal(size=(10, 16))])
    pairs = {tuple(p) for p in semantic_pairs(x, threshold=0.99, per_cluster=5).tolist()}
    # the three near-copies of each centre pair up; the random rows do not
    assert pairs == {(3 * c + i, 3 * c + j) for c in range(5) for i in range(3) for j in range(i + 1, 3)}
    labels = kmeans(x / np.linalg.norm(x, axis=1, keepdims=True), 5)
    assert all(len(set(labels[3 * c:3 * c + 3])) == 1 for c in range(5))


def test_text_presence_uses_the_detector_alone():
    from blip3.datagen.curate_stages import TextPresenceStage

    page = Image.new("RGB", (400, 120), "white")
    ImageDraw.Draw(page).text((10, 40), "HELLO WORLD 2024", fill="black", font_size=40)
    out = TextPresenceStage()({"key": ["text", "none", "bad"], "image": [encode(page), encode(picture(3)), b"x"]})
    assert out["score.text_boxes"][0] >= 1 and out["score.text_boxes"][1] == 0 and np.isnan(out["score.text_boxes"][2])
