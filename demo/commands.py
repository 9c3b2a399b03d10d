"""`blip3 demo`: the main job on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blip3.core.options import local_out_option


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = local_out_option("folder for everything the demo writes (replaced when empty or an earlier "
                                     "demo's)", default=Path("blip3-demo")),
        force: bool = typer.Option(False, "--force", help="Replace --out even if it is not an earlier demo output."),
        workers: int = typer.Option(2, "--workers", help="Ray actors for OCR and grounding."),
        train_steps: Optional[int] = typer.Option(None, "--train-steps", help="Cap the steps of each training stage."),
        corpus_only: bool = typer.Option(False, "--corpus-only", help="Only write the corpus (OUT/corpus) and stop."),
    ) -> None:
        """Generate a small corpus, caption it (OCR, grounding) on Ray, mix it, train the tiny model, write a report."""
        if corpus_only:
            from blip3.core.logs import console
            from blip3.demo.corpus import build_corpus
            from blip3.demo.run import claim_out_dir

            corpus = build_corpus(claim_out_dir(out, force=force, wipe=False) / "corpus")
            console.print(f"corpus written to {corpus.root}: local/ (images), web/, scenes/ (+ coco.json)")
            return
        from blip3.demo.run import run_demo

        run_demo(out, workers=workers, train_steps=train_steps, force=force)
