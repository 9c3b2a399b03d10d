"""The data-preparation step a pipeline declares, run by `blip3 train` before the first stage.

A stage file may say how its data comes to exist (`data.generate: tiny`: the tiny synthetic
shards, written once under the cache). `prepare_data` runs what every stage of the pipeline
declares and returns the `${VAR}`s their mixture specs name (`BLIP3_TINY_DATA`); the trainer
passes them to the manifest build explicitly. Training itself never generates data, and nothing
travels through the process environment.
"""

from __future__ import annotations

from typing import Iterable

from blip3.core.logs import get_logger
from blip3.train.config import StageConfig

log = get_logger("train")

#: What each known `data.generate` value provides: the spec variable it sets.
TINY_VAR = "BLIP3_TINY_DATA"


def prepare_data(stages: Iterable[StageConfig]) -> dict[str, str]:
    """Run the preparation the stages declare (each kind once); the spec variables it gives."""
    variables: dict[str, str] = {}
    for stage in stages:
        if stage.data.generate == "tiny" and TINY_VAR not in variables:
            from blip3.mixture.tiny_sources import ensure_tiny_data

            variables[TINY_VAR] = str(ensure_tiny_data())
            log.info(f"data: tiny shards ready under {variables[TINY_VAR]}")
    return variables
