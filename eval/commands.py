"""CLI of `eval`: `blip3 eval CHECKPOINT TASK... [--data DIR] [--shots N] [--limit N]`.

Data-parallel: `torchrun --nproc-per-node N -m blip3.cli eval ...` splits the questions across
ranks (one device each); rank 0 scores, records and prints."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from blip3.core.options import DbOption


def eval_command(
    checkpoint: Path = typer.Argument(..., help="A model directory (or a training stage's output folder)."),
    tasks: List[str] = typer.Argument(..., help="vqav2 | okvqa | textvqa | coco | pope | mmbench"),
    data: Path = typer.Option(Path("eval-data"), "--data", envvar="BLIP3_EVAL_DATA",
                              help="Folder with one sub-folder per benchmark, in its published layout."),
    shots: int = typer.Option(0, "--shots", help="In-context examples from the train split (0, 4, 8...)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions of each task."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Predictions folder (default: CHECKPOINT/eval)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Samples per forward pass."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    seed: int = typer.Option(0, "--seed", help="Seed of the in-context example draw."),
    meteor: Optional[bool] = typer.Option(None, "--meteor/--no-meteor", help="Captioning METEOR (needs Java; "
                                          "default: when Java is installed)."),
    db: Path = DbOption,
) -> None:
    """Run benchmarks on a checkpoint; resumable; results go to the catalog's `evals` table."""
    import pyarrow as pa

    from blip3.core.tables import write_result
    from blip3.eval.runner import evaluate
    from blip3.model.directory import model_dir

    results = evaluate(checkpoint, tasks, data=data, out=out or model_dir(checkpoint) / "eval", shots=shots,
                       limit=limit, batch_size=batch_size, device=device, seed=seed, db=db, meteor=meteor)
    if not results:
        return  # a torchrun rank other than 0: rank 0 prints
    rows = [{"task": r.task, "shots": r.shots, "metric": m, "value": round(v, 4), "n": r.n}
            for r in results for m, v in r.metrics.items()]
    write_result(pa.Table.from_pylist(rows), title=f"{checkpoint} (run {results[0].run_id or 'unknown'})")


def register(app: typer.Typer) -> None:
    """Add `blip3 eval ...` to the app."""
    app.command("eval")(eval_command)
