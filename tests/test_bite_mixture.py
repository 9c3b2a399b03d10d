"""A `weight_by: tokens` mixture is drawn by sample share, so its token shares come out as asked."""

from __future__ import annotations

from collections import Counter

import pytest

from blip3.mixture.build import build_manifest
from blip3.mixture.loader import MixtureLoader
from tests.mixture_fixtures import inline, tiny_sources  # noqa: F401  (fixture)


def test_loader_draws_a_tokens_mixture_by_sample_weight(tiny_sources):  # noqa: F811
    m = build_manifest({"name": "by-tokens", "seed": 5, "weight_by": "tokens",
                        "sources": inline(tiny_sources, {"caption-ocr": 1, "interleaved": 1})})
    ocr, doc = m.sources
    assert ocr.weight == pytest.approx(0.5) and doc.weight == pytest.approx(0.5)
    assert ocr.sample_weight > 0.6  # short captions: many more of them per token
    n = 4000
    counts = Counter(s["source"] for s in MixtureLoader(m, decode=False).take(n))
    for src in (ocr, doc):
        assert counts[src.name] / n == pytest.approx(src.sample_weight, abs=0.01), (src.name, counts)
    # and so the tokens drawn split as the weights say
    tokens = {src.name: counts[src.name] * src.tokens / src.samples for src in (ocr, doc)}
    assert tokens[ocr.name] / sum(tokens.values()) == pytest.approx(0.5, abs=0.02)
