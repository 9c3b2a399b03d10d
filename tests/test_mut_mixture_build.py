"""`blip3 mix build` details a user sees in the manifest or the error line: `${VAR}` expansion,
spec defaults and bounds, the vision-token check and the weight arithmetic (exact values, so a
changed rounding or operator shows)."""

from __future__ import annotations

import pytest

from blip3.core.errors import UserError
from blip3.mixture.build import build_manifest, validate_spec
from blip3.mixture.tokens import DEFAULT_VISION_TOKENS_PER_CROP
from tests.mixture_fixtures import inline, tiny_sources  # noqa: F401


def _spec(sources: list[dict], **extra) -> dict:
    return {"name": "m", **extra, "sources": sources}


def _one(path: str, name: str = "caption-ocr", kind: str = "caption") -> list[dict]:
    return [{"name": name, "path": path, "kind": kind, "weight": 1}]


# ---- ${VAR} / ${VAR:-default} in source paths -------------------------------------------------

def test_variable_from_the_build_wins_over_the_default(tiny_sources, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MBUILD_ROOT", raising=False)
    m = build_manifest(_spec(_one("${MBUILD_ROOT:-/nonexistent}")),
                       variables={"MBUILD_ROOT": str(tiny_sources["caption-ocr"])})
    assert m.sources[0].samples == 48


def test_unset_variable_falls_back_to_its_default(tiny_sources, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MBUILD_UNSET", raising=False)
    m = build_manifest(_spec(_one("${MBUILD_UNSET:-" + str(tiny_sources["caption-ocr"]) + "}")))
    assert m.sources[0].samples == 48


def test_unset_variable_without_default_names_the_variable(monkeypatch):
    monkeypatch.delenv("MBUILD_MISSING", raising=False)
    with pytest.raises(UserError) as e:
        build_manifest(_spec(_one("${MBUILD_MISSING}/shards")))
    assert "environment variable MBUILD_MISSING is not set" in str(e.value)
    assert e.value.field == "sources[0].path"


# ---- spec defaults and bounds ------------------------------------------------------------------

def test_seed_defaults_to_zero(tiny_sources):  # noqa: F811
    assert build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1}))).seed == 0


@pytest.mark.parametrize("seed", [True, 2.5, "3", -1])
def test_a_seed_that_is_not_an_integer_from_zero_is_refused(seed):
    with pytest.raises(UserError, match="must be an integer >= 0") as e:
        validate_spec(_spec(_one("x"), seed=seed))
    assert e.value.field == "seed"


def test_unknown_fields_are_listed_and_the_first_is_named():
    with pytest.raises(UserError, match=r"unknown field\(s\) epochs, shuffle$") as e:
        validate_spec(_spec(_one("x"), shuffle=True, epochs=2))
    assert e.value.field == "epochs"
    with pytest.raises(UserError) as e:
        validate_spec(_spec(_one("x"), epochs=2))
    assert e.value.field == "epochs"


def test_one_vision_token_per_crop_is_accepted_zero_is_not():
    ok = validate_spec(_spec(_one("x"), vision_tokens_per_crop=1))
    assert ok["vision_tokens_per_crop"] == 1
    with pytest.raises(UserError) as e:
        validate_spec(_spec(_one("x"), vision_tokens_per_crop=0))
    assert e.value.field == "vision_tokens_per_crop"


def test_a_target_of_one_sample_is_accepted(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1}), target={"samples": 1}))
    assert m.target["samples"] == 1 and m.sources[0].target_samples == 1


@pytest.mark.parametrize("path", ["", 5])
def test_source_path_must_be_a_non_empty_string(path):
    with pytest.raises(UserError) as e:
        validate_spec(_spec(_one(path)))
    assert e.value.field == "sources[0].path" and "must be a path" in str(e.value)


# ---- vision tokens per crop: spec vs the caller's model ----------------------------------------

def test_declared_vision_tokens_equal_to_the_model_build(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1}), vision_tokens_per_crop=7),
                       vision_tokens_per_crop=7)
    assert m.vision_tokens_per_image == 7


def test_declared_vision_tokens_other_than_the_model_is_an_error(tiny_sources):  # noqa: F811
    with pytest.raises(UserError, match="declares 7 vision tokens per crop, the model has 9") as e:
        build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1}), vision_tokens_per_crop=7),
                       vision_tokens_per_crop=9)
    assert e.value.field == "vision_tokens_per_crop"


@pytest.mark.parametrize("declared,model,expected", [
    (7, None, 7), (None, 9, 9), (None, None, DEFAULT_VISION_TOKENS_PER_CROP)])
def test_vision_tokens_come_from_the_spec_else_the_model_else_the_default(tiny_sources, declared, model,  # noqa: F811
                                                                         expected):
    extra = {} if declared is None else {"vision_tokens_per_crop": declared}
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1}), **extra), vision_tokens_per_crop=model)
    assert m.vision_tokens_per_image == expected


# ---- the plan's arithmetic ---------------------------------------------------------------------

def test_largest_remainder_tops_up_to_the_exact_target(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1, "caption-grounding": 1, "interleaved": 1}),
                             target={"samples": 10}))
    assert [s.target_samples for s in m.sources] == [4, 3, 3]
    assert m.target["samples"] == 10


def test_target_tokens_use_the_fractional_mean_per_sample(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1, "interleaved": 1}), target={"samples": 20}))
    for s in m.sources:
        mean = s.tokens / s.samples
        assert mean != int(mean)  # precondition: a floor division would change the count
        assert s.target_tokens == round(s.target_samples * mean)
    assert m.target["tokens"] == sum(s.target_tokens for s in m.sources)


def test_sample_weights_and_epochs_are_rounded_to_their_documented_digits(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 2, "interleaved": 1})))
    ocr, doc = m.sources
    assert (ocr.sample_weight, doc.sample_weight) == (0.666666666667, 0.333333333333)
    assert doc.target_samples == 24 and doc.epochs == 0.5
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 3, "interleaved": 1})))
    assert m.sources[1].target_samples == 16 and m.sources[1].epochs == 0.333333


def test_a_tiny_token_target_still_plans_one_sample(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1}), target={"tokens": 1}))
    assert m.target["samples"] == 1 and m.sources[0].target_samples == 1
    assert m.target["tokens"] == m.sources[0].target_tokens == round(m.sources[0].tokens / 48)


def test_a_token_target_is_turned_into_samples_by_the_mixs_mean(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 1, "interleaved": 1}), target={"tokens": 50_000}))
    per_sample = sum(s.sample_weight * s.tokens / s.samples for s in m.sources)
    assert m.target["samples"] == round(50_000 / per_sample)
    assert m.target["tokens"] == sum(s.target_tokens for s in m.sources)


def test_token_sample_weights_are_rounded_to_twelve_digits(tiny_sources):  # noqa: F811
    m = build_manifest(_spec(inline(tiny_sources, {"caption-ocr": 2, "interleaved": 1}), weight_by="tokens"))
    raw = [s.weight / (s.tokens / s.samples) for s in m.sources]
    assert [s.sample_weight for s in m.sources] == [round(r / sum(raw), 12) for r in raw]
    assert any(s.sample_weight != r / sum(raw) for s, r in zip(m.sources, raw))  # precondition: rounding shows


def test_one_pass_over_a_one_sample_source_plans_one_sample(tmp_path):
    """The default target is one pass of the heaviest source, even when that is a single sample."""
    import random

    from blip3.mixture.tiny_sources import _captions, _write

    _write(tmp_path / "one", 0, _captions(random.Random(0), 1), "one", "caption")
    m = build_manifest(_spec(_one(str(tmp_path / "one"), name="one")))
    assert m.target["samples"] == m.sources[0].target_samples == 1 and m.sources[0].epochs == 1.0


def test_the_top_up_goes_to_the_largest_remainders_not_the_smallest_sources():
    """10 over weights .12/.35/.53 is 1.2/3.5/5.3: the one sample left goes to the .5 remainder."""
    from blip3.mixture.build import apportion

    assert apportion(10, [0.12, 0.35, 0.53]) == [1, 4, 5]
    assert apportion(10, [0.53, 0.35, 0.12]) == [5, 4, 1]
