"""`blip3 demo`: the whole product on a generated corpus, in a few minutes on two CPU cores.

    corpus (demo.corpus) --HTTP on 127.0.0.1, fetched by the shard tasks--> web shards
      --blip3 ocr (Ray)--> ocr-web, ocr-local        --blip3 ground (annotations)--> coco-grounding
      --catalog + sources (interleaved, sft, dpo)--> mixture manifest --> SQL stats, plot
      --blip3 train manifests/tiny/pipeline.yaml (pretrain on the demo's captions)--> 5 checkpoints
      --> report.html (contact sheets, mixture plot, loss curves)

Everything lands in one folder (default `blip3-demo/`), with its own catalog
(`blip3-demo/catalog.duckdb`), so the demo never touches the user's catalog. Re-running starts over:
the folder is replaced only when it is empty or an earlier demo output (it holds `MARKER`);
any other folder is refused unless the user passes `--force` (see `claim_out_dir`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from blip3.core.logs import console

REPO = Path(__file__).resolve().parents[1]
TINY_PIPELINE = REPO / "manifests" / "tiny" / "pipeline.yaml"

MARKER = ".blip3-demo"  # written into every demo folder: "this is ours to replace"


def claim_out_dir(out: Path, *, force: bool = False, wipe: bool = True) -> Path:
    """Make `out` the demo's folder, replacing it (`wipe`) only when that loses nothing the user made.

    A folder that is missing, empty, or an earlier demo output (holds MARKER) is taken; any other
    folder is refused unless `force`, since a mistyped `--out ~/data` would otherwise be deleted.
    """
    from blip3.core.errors import UserError

    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError("is a file; --out needs a folder", file=out, field="--out")
    ours = (out / MARKER).is_file() or not out.exists() or not any(out.iterdir())
    if not ours and not force:
        raise UserError("is not empty and is not an earlier demo output; pass --force to replace it, "
                        "or choose another --out", file=out, field="--out")
    if wipe and out.exists():
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("written by `blip3 demo`; the folder is replaced by the next demo run\n")
    except OSError as e:
        raise UserError(f"cannot write here: {e.strerror}", file=out, field="--out") from None
    return out


SOURCES_QUERY = ("SELECT source, kind, shards, samples, ok, failed, mean_caption_chars, ocr_coverage, object_coverage "
                 "FROM v_source_summary ORDER BY source")


@dataclass
class DemoResult:
    out_dir: Path
    db: Path
    report: Path
    shards: dict[str, Path] = field(default_factory=dict)
    manifest: Path | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self, result: DemoResult, name: str):
        self.result, self.name = result, name

    def __enter__(self):
        console.rule(f"[bold]{self.name}")
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.result.seconds[self.name] = round(time.perf_counter() - self.t0, 2)


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(out_dir: str | Path = "blip3-demo", *, workers: int = 2, train_steps: int | None = None,
             force: bool = False) -> DemoResult:
    """Run every stage of the demo into `out_dir`; `train_steps` caps each training stage.
    `force` replaces an `out_dir` that is not an earlier demo output (see `claim_out_dir`)."""
    from blip3.core.catalog import Catalog
    from blip3.core.ray_session import ray_session
    from blip3.core.sql import run_query
    from blip3.core.tables import write_result
    from blip3.datagen.grounding import ground, make_config
    from blip3.datagen.ocr import run_ocr
    from blip3.datagen.pipeline import JobOptions
    from blip3.demo.corpus import build_corpus, write_url_list
    from blip3.demo.report import ReportInputs, write_report
    from blip3.demo.serve import serve_folder
    from blip3.datagen.audit import write_audit
    from blip3.mixture.build import build_manifest
    from blip3.mixture.plots import plot_mixture
    from blip3.mixture.sources import add_source
    from blip3.mixture.stats import mixture_queries
    from blip3.mixture.tokens import TokenCounter
    from blip3.train.config import load_any
    from blip3.train.pipeline import run_pipeline
    from blip3.mixture.tiny_sources import ensure_tiny_data

    out = claim_out_dir(Path(out_dir), force=force)
    db = out / "catalog.duckdb"
    res = DemoResult(out, db, out / "report.html")
    shards = out / "shards"

    with _Timer(res, "corpus"):
        corpus = build_corpus(out / "corpus")
        tiny = ensure_tiny_data()
        console.print(f"corpus: {len(corpus.texts)} rendered signs, real photos, {corpus.coco.name} scenes; tiny sources in {tiny}")

    with ray_session(num_cpus=max(workers, 1)):  # one cluster for the three datagen jobs
        with _Timer(res, "fetch + ocr"):
            with serve_folder(corpus.web_dir) as base_url:
                write_url_list(corpus, base_url)
                console.print(f"serving {corpus.web_dir.name}/ at {base_url}")
                r = run_ocr(corpus.urls, shards / "ocr-web",
                            JobOptions(workers=workers, db=db, source="ocr-web", shard_size=8))
            res.shards["ocr-web"] = r.output
            console.print(f"ocr-web: {r.successes} ok, {r.failed} failed {r.failure_reasons}")
            r = run_ocr(corpus.local_dir, shards / "ocr-local",
                        JobOptions(workers=workers, db=db, source="ocr-local", shard_size=8))
            res.shards["ocr-local"] = r.output
            console.print(f"ocr-local: {r.successes} ok, {r.failed} failed")
        with _Timer(res, "grounding"):
            cfg = make_config(detector="annotations", annotations=corpus.coco)
            r = ground(corpus.scenes_dir, shards / "coco-grounding", cfg,
                       JobOptions(workers=workers, db=db, source="coco-grounding", shard_size=8))
            res.shards["coco-grounding"] = r.output
            console.print(f"coco-grounding: {r.successes} ok, {r.failed} failed")

    with _Timer(res, "catalog + mixture"):
        counter = TokenCounter()
        with Catalog(db) as cat:
            for kind in ("interleaved", "sft", "dpo"):
                add_source(cat, f"tiny-{kind}", tiny / kind, kind, counter)
        spec = {
            "name": "demo-mix",
            "seed": 7,
            "target": {"samples": 240},
            "sources": [
                {"name": "ocr-web", "weight": 0.25},
                {"name": "ocr-local", "weight": 0.15},
                {"name": "coco-grounding", "weight": 0.2},
                {"name": "tiny-interleaved", "weight": 0.2},
                {"name": "tiny-sft", "weight": 0.1},
                {"name": "tiny-dpo", "weight": 0.1},
            ],
        }
        res.manifest = out / "demo-mix.manifest.yaml"
        build_manifest(spec, db=db, out=res.manifest)
        # the catalog summary, then exactly what `blip3 mix stats demo-mix` prints
        queries = {"sources": SOURCES_QUERY, **{f"demo-mix: {t}": q for t, q in mixture_queries("demo-mix").items()}}
        tables = {}
        for title, sql in queries.items():
            t = run_query(sql, db)
            write_result(t, title=title)
            tables[title] = t.to_pylist()
        mix_plot = plot_mixture("demo-mix", out / "mixture.png", db=db)
        audits = {name: write_audit(path, out / "audit" / name, n=24).html for name, path in res.shards.items()}

    with _Timer(res, "train (5 stages)"):
        pipeline = load_any(TINY_PIPELINE)
        pretrain_spec = _write_yaml(out / "pretrain-mix.yaml", {
            "name": "demo-pretrain",
            "seed": 7,
            "sources": [
                {"name": "ocr-web", "path": str(res.shards["ocr-web"]), "kind": "caption", "weight": 0.3},
                {"name": "ocr-local", "path": str(res.shards["ocr-local"]), "kind": "caption", "weight": 0.2},
                {"name": "coco-grounding", "path": str(res.shards["coco-grounding"]), "kind": "caption", "weight": 0.2},
                {"name": "tiny-interleaved", "path": str(tiny / "interleaved"), "kind": "interleaved", "weight": 0.3},
            ],
        })
        first = pipeline.stages[0]
        stages = [replace(first, data=replace(first.data, spec=str(pretrain_spec), manifest=None))] + pipeline.stages[1:]
        stages = [replace(s, steps=min(s.steps, train_steps) if train_steps and s.steps else s.steps) for s in stages]
        pipeline = replace(pipeline, stages=stages)
        results = run_pipeline(pipeline, db=db, out_root=out / "runs")
        for r in results:
            res.checkpoints[r.name] = r.final_dir
            loss = "n/a" if r.final_loss is None else f"{r.final_loss:.3f}"
            console.print(f"{r.name}: {r.steps} steps, final loss {loss} -> {r.final_dir}")
        t = run_query("SELECT stage, steps, tokens, round(final_loss, 4) AS final_loss, checkpoint FROM runs ORDER BY started_at", db)
        write_result(t, title="training runs")
        tables["training runs (from the catalog)"] = t.to_pylist()

    from blip3.eval.plot import plot_evals

    report = write_report(ReportInputs(
        out_dir=out,
        audits=audits,
        mixture_plot=mix_plot,
        stage_dirs={r.name: Path(r.output_dir) for r in results},
        tables=tables,
        notes=[f"{k}: {v:.1f} s" for k, v in res.seconds.items()],
        eval_plots=plot_evals(db, out),  # a stage file's `benchmarks`, when it names some
    ))
    res.report = report
    console.rule("[bold green]done")
    console.print(f"report:  {report}\ncatalog: {db}\n  try:   blip3 sql --db {db} \"SELECT * FROM v_source_summary\"")
    return res
