"""CLI commands of `train`: `blip3 train STAGE_OR_PIPELINE.yaml`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from blip3.core.options import DbOption, out_option, output_path


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `blip3` app."""

    @app.command("train")
    def train(
        config: Path = typer.Argument(..., help="A stage YAML or a pipeline YAML (manifests/tiny/pipeline.yaml)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint of each stage."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop each stage after N steps (checkpointed)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Put every stage's output under this folder."),
        db: Path = DbOption,
    ) -> None:
        """Train one stage, or a pipeline of stages (each stage's output is the next one's init).

        Multi-GPU: `torchrun --nproc-per-node N -m blip3.train CONFIG.yaml` (FSDP2).
        """
        from blip3.core.errors import UserError
        from blip3.core.logs import console
        from blip3.train.config import load_any

        if max_steps is not None and max_steps <= 0:
            raise UserError("must be > 0", field="--max-steps")
        pipeline = load_any(config)  # validated before torch is even imported
        from blip3.train.pipeline import run_pipeline

        results = run_pipeline(pipeline, resume=resume, max_steps=max_steps, db=db, out_root=out)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        for r in results:
            where = r.final_dir or f"{r.output_dir}/checkpoints (stopped)"
            loss = "n/a" if r.final_loss is None else f"{r.final_loss:.4f}"
            console.print(f"[green]{r.name}[/] ({r.stage}): {r.steps} steps, {r.tokens:,} tokens, "
                          f"final loss {loss}, trainable {100 * r.info['trainable_share']:.2f}% -> {where}")

    @app.command("merge-lora")
    def merge_lora(
        stage_dir: Path = typer.Argument(..., help="A stage output (or its final/) holding an unmerged adapter/."),
        output: Optional[Path] = typer.Argument(None, help="Model directory to write (the older form of -o/--out)."),
        out: Optional[Path] = out_option("model directory to write, adapters folded into the weights"),
    ) -> None:
        """Merge a stage's LoRA adapters into its base weights (for stages run with `lora.merge: false`)."""
        from blip3.core.errors import UserError
        from blip3.core.logs import console
        from blip3.model.directory import ADAPTER_DIR, load_model_dir, model_dir

        out = output_path(output, out, "model directory")
        if not (model_dir(stage_dir) / ADAPTER_DIR).is_dir():
            raise UserError(f"no {ADAPTER_DIR}/ to merge", file=model_dir(stage_dir))
        model, processor = load_model_dir(stage_dir)  # merges on load
        model.save_pretrained(out)
        processor.save_pretrained(out)
        console.print(f"[green]{out}[/]: adapters of {model_dir(stage_dir)} merged")
