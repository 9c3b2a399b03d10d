"""Shared fixtures of the trainer tests: the tiny five-stage chain, run once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "manifests" / "tiny"


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """(results, out_root, db) of `manifests/tiny/pipeline.yaml` run end to end on CPU."""
    from blip3.train.config import load_any
    from blip3.train.pipeline import run_pipeline

    os.environ["BLIP3_NO_PROGRESS"] = "1"
    out = tmp_path_factory.mktemp("tiny-chain")
    db = out / "catalog.duckdb"
    results = run_pipeline(load_any(TINY / "pipeline.yaml"), out_root=out, db=db)
    return results, out, db


def tiny_vars() -> dict[str, str]:
    """The spec variables of the tiny recipes (the data step `blip3 train` runs first)."""
    from blip3.mixture.tiny_sources import ensure_tiny_data
    from blip3.train.prepare import TINY_VAR

    return {TINY_VAR: str(ensure_tiny_data())}


def tiny_stage(name: str, tmp: Path, **changes):
    """A tiny stage config with its output under `tmp` and fields replaced (dotted keys allowed)."""
    from dataclasses import replace

    from blip3.train.config import load_stage

    cfg = load_stage(TINY / f"{name}.yaml")
    cfg.output_dir = str(tmp / name)
    for key, value in changes.items():
        if "." in key:
            group, field = key.split(".")
            setattr(cfg, group, replace(getattr(cfg, group), **{field: value}))
        else:
            setattr(cfg, key, value)
    return cfg


def rank_rows(batch, rank: int, world: int, config):
    """This rank's equal share of a micro-batch's rows, with the image crops those rows hold."""
    from blip3.train.data import Batch

    n_rows = batch.inputs["input_ids"].shape[0] // world
    rows = slice(n_rows * rank, n_rows * (rank + 1))
    part = {k: (v[rows] if k in ("input_ids", "labels", "segment_ids", "attention_mask") else v)
            for k, v in batch.inputs.items()}
    per_row = (batch.inputs["input_ids"] == config.image_placeholder_id).sum(1) // config.num_latents
    first, n = int(per_row[:rows.start].sum()), int(per_row[rows].sum())
    for k in ("pixel_values", "image_sizes"):
        if batch.inputs.get(k) is not None:
            part[k] = batch.inputs[k][first:first + n]
    return Batch(part)


def small_trained(seed: int = 0):
    """A two-layer model, its AdamW after one step (so the optimiser has state) and a scheduler:
    the smallest thing a checkpoint round trip can compare exactly."""
    import torch

    from blip3.train.schedule import build_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt, build_scheduler(opt, 1, 5, 0.0)
