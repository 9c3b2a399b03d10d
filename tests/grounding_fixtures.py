"""Fixtures of the grounding tests: tiny real models built and saved here, and a COCO scene set.
(Ray: the shared session fixture `ray_local` in conftest.py.)

- A tiny Grounding DINO (small Swin backbone, one-layer BERT text encoder, random weights, a
  WordPiece vocabulary written by the test) saved in the `IDEA-Research/grounding-dino-tiny`
  layout, so the loader users run (`AutoProcessor` / `AutoModelForZeroShotObjectDetection`) reads it.
- A tiny open_clip model (`pretrained=None`, random weights) saved in open_clip's local-dir layout.
- Shape scenes rendered with PIL, with `.txt` captions and a COCO file with real structure:
  categories, a crowd box, an image with no boxes, an image the file does not list, a corrupt image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

TAG_WORDS = ["dog", "cat", "person", "car", "tree", "football", "player", "field", "red", "green", "blue",
             "ball", "man", "horse", "circle", "square", "shape", "grass", "sky"]


def build_tiny_grounding_dino(out: Path, seed: int = 0) -> Path:
    """Save a ~0.2M-parameter random Grounding DINO with its processor and tokenizer to `out`."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "the", *TAG_WORDS]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    vocab = {w: i for i, w in enumerate((out / "vocab.txt").read_text().split())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=256)
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=2,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=256),
        num_queries=30, encoder_layers=1, decoder_layers=2, d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """Save a random tiny open_clip CLIP (`pretrained=None`) in open_clip's local-dir layout."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)  # random init, no pretrained weights
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return out


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def write_scenes(root: Path) -> dict:
    """Shape scenes + captions + coco.json; returns what the tests check against.

    scene_000: red circle (box A) and blue square, plus a crowd region; scene_001: green circle;
    scene_002: no boxes (listed in the file); unlisted_003: not in the file; broken_004: corrupt;
    `more/été (1)`: a blue square under a file name with a folder, accents, spaces and brackets.
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    categories = [{"id": 1, "name": "red circle", "supercategory": "shape"},
                  {"id": 2, "name": "blue square", "supercategory": "shape"},
                  {"id": 3, "name": "green circle", "supercategory": "shape"},
                  {"id": 7, "name": "unused", "supercategory": "shape"}]
    scenes = {
        "scene_000": ([(1, (12, 20, 48, 40)), (2, (100, 60, 40, 40))], "A red circle next to a blue square."),
        "scene_001": ([(3, (60, 30, 30, 30))], "A green circle on a white wall."),
        "scene_002": ([], "An empty white wall."),
        "unlisted_003": ([(1, (5, 5, 20, 20))], "A red circle."),
        "more/été (1)": ([(2, (0, 0, 80, 60))], "Un carré bleu."),  # a key that must be sanitised
    }
    colour_of = {1: "red", 2: "blue", 3: "green"}
    images, annotations = [], []
    for i, (name, (boxes, caption)) in enumerate(scenes.items()):
        img = Image.new("RGB", (160, 120), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for cat, (x, y, w, h) in boxes:
            shape = d.ellipse if cat in (1, 3) else d.rectangle
            shape((x, y, x + w, y + h), fill=COLOURS[colour_of[cat]])
        (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(images_dir / f"{name}.png")
        (images_dir / f"{name}.txt").write_text(caption)
        if name.startswith("unlisted"):
            continue
        images.append({"id": 100 + i, "file_name": f"{name}.png", "width": 160, "height": 120})
        for cat, bbox in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cat,
                                "bbox": list(bbox), "area": bbox[2] * bbox[3], "iscrowd": 0})
    annotations.append({"id": 99, "image_id": 100, "category_id": 1, "bbox": [0, 0, 160, 120],
                        "area": 19200, "iscrowd": 1, "segmentation": {"counts": [0], "size": [120, 160]}})
    (images_dir / "broken_004.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    coco = root / "instances.json"
    coco.write_text(json.dumps({"info": {"description": "test scenes"}, "images": images,
                                "annotations": annotations, "categories": categories}))
    return {"images": images_dir, "coco": coco}


@pytest.fixture(scope="session")
def tiny_gdino(tmp_path_factory) -> Path:
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("gdino") / "tiny-grounding-dino")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def scenes(tmp_path) -> dict:
    return write_scenes(tmp_path / "scenes")
