"""Every datagen engine follows one factory style (datagen/annotator.py): a frozen, picklable
config that the pipeline's actors call once to build an unloaded annotator."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

import blip3.datagen.grounding  # noqa: F401 - registers GroundingConfig as an AnnotatorConfig
import blip3.datagen.ocr  # noqa: F401 - registers OcrConfig
from blip3.datagen.annotator import Annotator, AnnotatorConfig
from blip3.datagen.grounding import GroundingAnnotator, GroundingConfig, make_config
from blip3.datagen.ocr import OcrAnnotator, OcrConfig


def _coco(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [],
                                "categories": [{"id": 1, "name": "cat"}]}))
    return path


def _configs(tmp_path) -> list[tuple[AnnotatorConfig, type]]:
    return [
        (OcrConfig(min_confidence=0.4, keep_empty=False, engine_options={"threads": 3}), OcrAnnotator),
        (GroundingConfig(tags="vocab", vocab=("cat",)), GroundingAnnotator),  # Grounding DINO: needs no weights to build
        (make_config(detector="annotations", annotations=_coco(tmp_path)), GroundingAnnotator),
    ]


def test_every_engine_config_is_a_frozen_dataclass():
    engines = set(AnnotatorConfig.__subclasses__())
    assert engines >= {OcrConfig, GroundingConfig}
    for cls in engines:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls


def test_configs_build_fresh_unloaded_annotators_and_travel_pickled(tmp_path):
    for config, annotator_cls in _configs(tmp_path):
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.drop_empty = True  # type: ignore[misc]
        assert pickle.loads(pickle.dumps(config)) == config
        first, second = config(), config()
        assert type(first) is annotator_cls and first is not second and first.config is config
        assert isinstance(first, Annotator)
        # the annotator is not a factory of itself (the other style): settings live in the config only
        assert not isinstance(first, AnnotatorConfig) and not callable(first)
        assert not dataclasses.is_dataclass(first)
        info = first.generator_info()  # no model load needed
        assert info and first.name in ("ocr", "grounding")


def test_ocr_config_keeps_its_own_engine_options():
    options = {"threads": 3}
    config = OcrConfig(engine_options=options)
    options["threads"] = 9
    assert config.engine_options == {"threads": 3}
    assert config().config.engine_options == {"threads": 3}
