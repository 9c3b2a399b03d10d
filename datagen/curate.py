"""`blip3 curate`: score, deduplicate and decontaminate catalogued samples, recorded in the catalog.

The job, for the catalogued sources asked for (default: every source):

1. **Per sample, on Ray Data** (datagen/curate_stages.py): one read task per shard yields its
   samples; `ImageStage` (fingerprints, size, aspect, blur), `TextStage` (caption length,
   repetition, language), optionally `TextPresenceStage` (OCR detector) and `ClipStage` (CLIP
   score, embeddings) run as `map_batches` stages next to the data. Images never reach the
   driver: the stages' small columns are written as parquet under `WORK/samples/` (atomically:
   a folder renamed into place when complete).
2. **In DuckDB over that parquet and the catalog** (core/curation.py): scores unpivoted into
   `sample_scores`, fingerprints into `sample_hashes`, threshold and language decisions by SQL
   (the rules and their defaults: datagen/curate_rules.py).
3. **Across samples**: `exact_dup` and `near_dup` over every hash in the catalog (all sources, not
   only this run's: a copy in another source is still a copy), `sem_dup` over this run's CLIP
   embeddings, `decontam` against the `blip3 eval` data folder.

Every result replaces the earlier rows of the same rules, shard by shard (core/curation.py), so a
re-run is idempotent, and a killed run leaves the catalog as the last finished run left it.
Nothing is deleted from any shard: `blip3 mix build` reads the decisions.

Why DuckDB + numpy, not a Ray Data groupby, for the cross-sample steps: the inputs are a few
columns of 8-64 bytes per sample that the catalog already holds; benchmarks/bench_curation.py
measures the LSH search over 10M hashes in one process (see docs/curation.md for the figures),
well inside a shuffle's own start-up cost at that size.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from blip3.core.catalog import Catalog, resolve_db
from blip3.core.curation import (Threshold, all_hashes, attach_run_samples, curatable_shards, decision_counts,
                                 replace_rows, run_hashes, run_rule_decisions, run_score_names, run_scores,
                                 source_ranks)
from blip3.core.errors import UserError
from blip3.core.logs import get_logger
from blip3.core.storage import url_scheme
from blip3.datagen.curate_rules import DEFAULT_LANGUAGES, DEFAULT_NEAR_DUP_BITS, LANGUAGE_RULE, THRESHOLD_RULES

log = get_logger("curate")
GENERATOR = "blip3 curate"
DECODES_RULE = "decodes"  # the image member decodes (else the reason says why)


@dataclass
class CurateOptions:
    sources: list[str] = field(default_factory=list)  # empty: every catalogued source
    work: Path | None = None  # default: `curation/` beside the catalog
    eval_data: Path | None = None
    clip_model: Path | None = None
    thresholds: dict[str, float | None] = field(default_factory=dict)  # overrides of the rule defaults
    languages: tuple[str, ...] | None = DEFAULT_LANGUAGES  # None: no language identification
    near_dup_bits: int = DEFAULT_NEAR_DUP_BITS
    text_presence: bool = False
    sem_dedup: bool = False
    sem_threshold: float = 0.95
    ray_address: str | None = None
    num_cpus: int | None = None
    actors: int = 1  # model actors (CLIP, OCR detector): each loads the model once
    gpus_per_actor: float = 0.0  # GPUs each CLIP actor asks Ray for (0: CPU)

    def threshold(self, rule: str) -> float | None:
        return self.thresholds.get(rule, THRESHOLD_RULES[rule].default)


@dataclass
class CurateResult:
    samples: int
    shards: int
    decisions: dict[str, dict[str, int]]  # rule -> {"kept": n, "dropped": n}
    benchmark_tasks: list[str] = field(default_factory=list)
    benchmark_skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{rule}: {d['dropped']} dropped" for rule, d in sorted(self.decisions.items())]
        line = f"curated {self.samples} samples in {self.shards} shards ({self.seconds:.1f}s); " + ", ".join(parts)
        if self.benchmark_tasks:
            line += f"; benchmarks checked: {', '.join(self.benchmark_tasks)}"
        return line


def _shards(cat: Catalog, names: list[str]) -> list[dict[str, str]]:
    known = cat.source_names()
    for name in names:
        if name not in known:
            raise UserError(f"unknown source {name!r} (catalog has: {', '.join(known) or 'none'})", field="--source")
    rows = curatable_shards(cat.con, names)
    if not rows:
        raise UserError("no catalogued shards to curate (register them with `blip3 catalog add` or `blip3 source add`)")
    remote = next((p for _, p in rows if url_scheme(p) is not None), None)
    if remote is not None:
        raise UserError(f"curation reads local shards; {remote} is on an object store (copy the source locally, or "
                        "curate the folder it was written from)", field="--source")
    return [{"source": s, "shard": p} for s, p in rows]


def score_samples(shards: list[dict[str, str]], out: Path, opts: CurateOptions) -> Path:
    """Run the per-sample stages on Ray Data; their columns (no image bytes) land in `out/samples/`."""
    import ray.data

    from blip3.core.logs import progress_enabled
    from blip3.core.ray_session import ray_session
    from blip3.datagen.curate_stages import ImageStage, TextPresenceStage, TextStage, read_shard_samples

    final = out / "samples"
    tmp = out / ".samples.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines are not for users
    # Ray Data's bars when ours are on; when they are off, its notice that they are is noise too.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    with ray_session(opts.ray_address, opts.num_cpus):
        ray.data.DataContext.get_current().enable_progress_bars = progress_enabled()
        ds = ray.data.from_items(shards, override_num_blocks=len(shards))
        ds = ds.map_batches(read_shard_samples, batch_size=1)
        ds = ds.map_batches(ImageStage(), batch_size=256)
        ds = ds.map_batches(TextStage(languages=opts.languages is not None), batch_size=256)
        if opts.text_presence:
            ds = ds.map_batches(TextPresenceStage, batch_size=32, compute=ray.data.ActorPoolStrategy(size=opts.actors))
        if opts.clip_model is not None:
            from blip3.datagen.clip_score import ClipStage

            ds = ds.map_batches(ClipStage, batch_size=64, compute=ray.data.ActorPoolStrategy(size=opts.actors),
                                num_gpus=opts.gpus_per_actor,
                                fn_constructor_kwargs={"model_dir": str(opts.clip_model), "embeddings": opts.sem_dedup})
        ds = ds.drop_columns(["image", "caption"])
        try:
            ds.write_parquet(str(tmp))
        except Exception as e:  # a worker's UserError (a catalogued tar that no longer reads) is one line
            raise _user_error(e) or e
    if not any(tmp.glob("*.parquet")):
        raise UserError("the shards hold no samples to curate")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _user_error(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised, found in the chain Ray wraps it in (None if there is none)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def run_curation(db: str | Path | None, opts: CurateOptions) -> CurateResult:
    """The whole job (module docstring); returns counts of what each rule decided."""
    from blip3.datagen.tags_clip import resolve_clip_model

    started = time.monotonic()
    if opts.clip_model is not None or opts.sem_dedup:
        opts.clip_model = resolve_clip_model(opts.clip_model, "CLIP score and semantic dedup")
    bench = None
    if opts.eval_data is not None:
        from blip3.datagen.decontam import benchmark_images

        bench = benchmark_images(opts.eval_data)  # a bad folder fails before the long part
    work = Path(opts.work) if opts.work else resolve_db(db).resolve().parent / "curation"
    work.mkdir(parents=True, exist_ok=True)
    with Catalog(db) as cat:
        shards = _shards(cat, opts.sources)
    samples_dir = score_samples(shards, work, opts)
    with Catalog(db) as cat:
        con = cat.con
        n = attach_run_samples(con, samples_dir)
        run_shards = [s["shard"] for s in shards]
        _record_hashes(con, run_shards)
        _record_scores(con, run_shards, opts)
        _record_threshold_decisions(con, run_shards, opts)
        _record_duplicates(con, opts)
        if opts.sem_dedup:
            _record_semantic(con, samples_dir, run_shards, opts)
        if bench is not None:
            _record_decontam(con, bench, opts)
        counts = decision_counts(con, run_shards)
    result = CurateResult(n, len(shards), counts,
                          bench.tasks if bench else [], bench.skipped if bench else {},
                          time.monotonic() - started)
    (work / "report.json").write_text(json.dumps(result.__dict__, indent=1, default=str))
    return result


def _record_hashes(con, shards: list[str]) -> None:
    replace_rows(con, "sample_hashes", run_hashes(con), shards)


def _record_scores(con, shards: list[str], opts: CurateOptions) -> list[str]:
    """Unpivot the run's `score.*` columns into `sample_scores`; returns the score names."""
    names = run_score_names(con)
    clip = f"open_clip {Path(opts.clip_model).name}" if opts.clip_model else None
    generators = {name: clip if name == "clip" else "py3langid" if name == "lang_score" else GENERATOR
                  for name in names}
    replace_rows(con, "sample_scores", run_scores(con, generators), shards, names)
    return names


def _record_threshold_decisions(con, shards: list[str], opts: CurateOptions) -> None:
    """Threshold and language rules over every recorded score of the run's shards (a CLIP score
    from an earlier run is still judged with today's threshold); a rule switched off loses its rows."""
    thresholds = [Threshold(rule.name, rule.score, rule.drop_when, t) for rule in THRESHOLD_RULES.values()
                  if (t := opts.threshold(rule.name)) is not None]
    rows = run_rule_decisions(con, shards, thresholds, opts.languages, language_rule=LANGUAGE_RULE,
                              decodes_rule=DECODES_RULE)
    replace_rows(con, "sample_decisions", rows, shards, [*THRESHOLD_RULES, LANGUAGE_RULE, DECODES_RULE])


def _record_duplicates(con, opts: CurateOptions) -> None:
    from blip3.datagen.dedup import exact_duplicates, near_duplicates

    hashes = all_hashes(con)
    shards = hashes["shard"].unique().to_pylist()
    exact, kept = exact_duplicates(hashes)
    replace_rows(con, "sample_decisions", exact, shards, ["exact_dup"])
    near = near_duplicates(hashes.filter(pa.array(kept)), opts.near_dup_bits)
    replace_rows(con, "sample_decisions", near, shards, ["near_dup"])


def _record_semantic(con, samples_dir: Path, shards: list[str], opts: CurateOptions) -> None:
    import pyarrow.parquet as pq

    from blip3.datagen.dedup import cluster_decisions, components
    from blip3.datagen.semdedup import semantic_pairs

    run = pq.read_table(samples_dir, columns=["source", "shard", "key", "embedding", "score.width", "score.height"])
    run = run.filter(pa.compute.invert(pa.compute.is_null(run["embedding"])))
    rank = source_ranks(con)
    t = pa.table({"source": run["source"], "shard": run["shard"], "key": run["key"],
                  "width": run["score.width"], "height": run["score.height"],
                  "source_rank": pa.array([rank[s] for s in run["source"].to_pylist()], pa.int64())})
    emb = np.asarray(run["embedding"].to_pylist(), dtype=np.float32)
    pairs = semantic_pairs(emb, threshold=opts.sem_threshold)
    rows, _ = cluster_decisions(t, components(t.num_rows, pairs), "sem_dup",
                                f"semantic copy (CLIP cosine >= {opts.sem_threshold})")
    replace_rows(con, "sample_decisions", rows, shards, ["sem_dup"])


def _record_decontam(con, bench: Any, opts: CurateOptions) -> None:
    from blip3.datagen.decontam import match_benchmarks

    hashes = all_hashes(con)
    shards = hashes["shard"].unique().to_pylist()
    matches, decisions = match_benchmarks(hashes, bench, opts.near_dup_bits)
    replace_rows(con, "benchmark_matches", matches, shards)
    replace_rows(con, "sample_decisions", decisions, shards, ["decontam"])
