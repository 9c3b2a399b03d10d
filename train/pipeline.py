"""Run the stages of a pipeline in order; each stage starts from the previous stage's `final/`.

First the data step the stages declare (`train.prepare`), then the stages.

With `resume`, a stage whose `final/` exists is skipped (its output feeds the next), and the
first unfinished one continues from its latest checkpoint. `max_steps` interrupts the running
stage after that many steps (a checkpoint is written, no `final/`), and the pipeline stops there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from blip3.core.logs import get_logger
from blip3.train.config import PipelineConfig
from blip3.train.loop import StageResult, train_stage

log = get_logger("train")


def run_pipeline(
    pipeline: PipelineConfig,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    db: str | Path | None = None,
    out_root: str | Path | None = None,
) -> list[StageResult]:
    from blip3.model.runtime import init_distributed

    from blip3.train.prepare import prepare_data

    info = init_distributed()
    # the explicit data step the pipeline's stages declare, before the first stage
    data_vars = prepare_data(pipeline.stages)
    results: list[StageResult] = []
    prev_final: Path | None = None
    for i, stage in enumerate(pipeline.stages):
        if out_root is not None:
            stage = replace(stage, output_dir=str(Path(out_root) / Path(stage.output_dir).name))
        final = Path(stage.output_dir) / "final"
        if resume and (final / "config.json").is_file():
            log.info(f"{stage.name}: finished earlier, using {final}")
            prev_final = final
            continue
        result = train_stage(stage, init_path=str(prev_final) if i > 0 else None, resume=resume,
                             max_steps=max_steps, db=db, dist_info=info, data_vars=data_vars)
        results.append(result)
        if result.final_dir is None:
            log.info(f"{stage.name}: stopped at step {result.steps} (--max-steps); rerun with --resume")
            break
        prev_final = result.final_dir
    return results
