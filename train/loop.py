"""The training loop of one stage, in four parts read top to bottom:

    build_run   model, processor, objective, optimiser, schedule, data -> resume? -> parallelize
    train_step  the step's micro-batches -> items of the whole step (all ranks) ->
                per micro-batch: forward under autocast -> loss sum / step items -> backward
                -> clip -> optimiser step -> schedule step
    evaluate    the objective on fixed held-out micro-batches
    finish      final checkpoint, `final/` model dir, catalog row

The loop does not know its stage: the builders chose the objective (`train.objective`:
cross-entropy, or DPO against the adapter-disabled reference) and the data stream.
A non-finite loss stops the stage with one clear line; the checkpoints on disk are those of
earlier, finite steps, and the catalog records the run as failed with that reason.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from blip3.core.catalog import resolve_db
from blip3.core.errors import UserError
from blip3.core.logs import get_logger, progress
from blip3.model.flops import flops_model, mfu, peak_flops
from blip3.model.runtime import DistInfo, init_distributed
from blip3.model.weights import materialize
from blip3.train.builders import build_model, build_objective, build_optimizer, build_stream, resolve_manifest, unwrap
from blip3.train.checkpoint import PendingCheckpoint, latest_checkpoint, load_checkpoint, start_checkpoint
from blip3.train.config import StageConfig
from blip3.train.data import Batch, DataRanks, count_crops, count_tokens
from blip3.train.distributed import all_reduce_sum, parallelize
from blip3.train.metrics import MetricsWriter
from blip3.train.objective import Objective
from blip3.train.schedule import build_scheduler

log = get_logger("train")
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "segment_ids")


class NonFiniteLoss(UserError):
    """The loss became NaN or inf: the stage stops and keeps its last finite checkpoint."""


@dataclass
class StageResult:
    stage: str
    name: str
    output_dir: Path
    final_dir: Path | None  # None when stopped early (--max-steps) before the end
    steps: int
    tokens: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    run_id: str = ""


@dataclass
class Run:
    """Everything `build_run` made for one stage; the other parts read and advance it."""

    cfg: StageConfig
    info: DistInfo
    bf16: bool
    out: Path
    start_from: str | None
    manifest: Any
    model: torch.nn.Module
    processor: Any
    pinfo: dict
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: DataRanks
    steps_total: int
    step: int = 0
    tokens: int = 0
    run_id: str = ""
    resumed: bool = False
    pending: PendingCheckpoint | None = None  # the checkpoint still being written
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def device(self) -> torch.device:
        return self.info.device


@dataclass
class StepStats:
    loss: float  # the step's objective: summed loss / items, over all micro-batches and ranks
    items: int  # what the loss was divided by (labelled tokens, or pairs), all ranks
    tokens: int  # real positions of this rank's micro-batches (tokens/s, MFU)
    crops: int
    skipped: int
    grad_norm: float | None
    lr: float
    extras: dict[str, float]


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items() if k in MODEL_KEYS and v is not None}


def total_steps(cfg: StageConfig, world_size: int) -> int:
    """Optimiser steps of the stage; a token budget is converted at full rows of seq_len."""
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch.micro_batch_size * cfg.batch.seq_len * cfg.batch.grad_accum * world_size
    return max(1, math.ceil(cfg.tokens / per_step))


# -- build ------------------------------------------------------------------------------------------


def build_run(cfg: StageConfig, *, init_path: str | None, resume: bool, db, info: DistInfo, record: bool,
              data_vars: Mapping[str, str] | None = None) -> Run:
    """Build the stage's parts, resume from the latest checkpoint if asked, apply parallelism."""
    if info.distributed and not cfg.runtime.fsdp:
        # without FSDP nothing synchronises gradients: each rank would train its own copy
        raise UserError(f"{info.world_size} ranks need `runtime.fsdp: true` (there is no other data-parallel "
                        "wrapper); run one process or enable it", field="runtime.fsdp", file=cfg.source)
    device = info.device
    if cfg.runtime.attention == "flex" and device.type != "cuda":
        raise UserError("runtime.attention: flex trains on a GPU only (torch has no FlexAttention backward on "
                        f"{device.type}); use dense here", field="runtime.attention", file=cfg.source)
    bf16 = cfg.runtime.precision == "bf16" or (cfg.runtime.precision == "auto" and device.type == "cuda")
    out = Path(cfg.output_dir)
    start_from = init_path or cfg.init.path
    if start_from is not None and not Path(start_from).exists():
        raise UserError(f"no model at {start_from} (run the previous stage first)", field="init.path", file=cfg.source)
    if info.is_main:
        if not resume and out.exists():
            for sub in ("checkpoints", "final", "metrics.jsonl"):
                p = out / sub
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and cfg.runtime.cpu_threads:
        torch.set_num_threads(cfg.runtime.cpu_threads)
    torch.manual_seed(cfg.seed + info.rank)

    # recorded runs also record their mixture, so `blip3 sql` joins runs to mixtures and sources
    manifest = resolve_manifest(cfg, out, resolve_db(db) if record else None, info.is_main, data_vars or {},
                                init_path=start_from)
    if info.distributed:
        torch.distributed.barrier()
    # build_model seeds with init.seed (the same weights on every rank); the fork keeps the stream
    # of cfg.seed + rank for what follows (noise, dropout)
    with torch.random.fork_rng(devices=[]):
        model, processor, pinfo = build_model(cfg, init_path)
    if cfg.lora.enabled:
        log.info(f"{cfg.name}: LoRA r={cfg.lora.rank} trains {pinfo['trainable_params']:,} of {pinfo['params']:,} "
                 f"parameters ({100 * pinfo['trainable_share']:.2f}%)")
    weights_file = pinfo.pop("weights_file")
    if weights_file is None:
        model.to(device)
    objective = build_objective(cfg, unwrap(model).config)
    stream = DataRanks(lambda rank, world: build_stream(cfg, manifest, processor, replace(info, rank=rank, world_size=world),
                                                        verify="size"),
                       info.rank, info.world_size, grad_accum=cfg.batch.grad_accum)
    model = parallelize(model, ac=cfg.runtime.activation_checkpointing, compile=cfg.runtime.compile,
                        fsdp=info.distributed, bf16=bf16, reduce_dtype=cfg.runtime.reduce_dtype,
                        reshard_after_forward=cfg.runtime.reshard_after_forward)
    if weights_file is not None:  # built on the meta device: real (sharded) tensors now
        materialize(model, weights_file, device, from_rank0=info.distributed)
    # the optimiser holds the parameters as FSDP2 leaves them (sharded DTensors): build it after
    optimizer = build_optimizer(model, cfg, device)
    steps_total = total_steps(cfg, info.world_size)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, steps_total, cfg.optim.min_lr_ratio)
    run = Run(cfg, info, bf16, out, start_from, manifest, model, processor, pinfo, objective, optimizer, scheduler,
              stream, steps_total, run_id=f"{cfg.name}-{uuid.uuid4().hex[:8]}")
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        stream.load_state_dict(meta["data"])
        if len(stream.streams) > 1:
            log.info(f"{cfg.name}: {info.world_size} process(es) continue the data of {stream.data_world_size} ranks, "
                     f"{len(stream.streams)} each (one micro-batch from each in turn)")
        run.step, run.tokens, run.run_id = meta.get("step", 0), meta.get("tokens", 0), meta.get("run_id", run.run_id)
        run.resumed = True
        log.info(f"{cfg.name}: resumed from {ckpt} at step {run.step}")
    return run


# -- step -------------------------------------------------------------------------------------------


def _lap(timings: dict[str, float] | None, key: str, t0: float, device: torch.device) -> float:
    """Add the time since t0 to timings[key] (device synchronised first); returns now."""
    if timings is None:
        return t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - t0
    return now


def train_step(model, objective: Objective, batches: list[Batch], *, optimizer=None, scheduler=None,
               grad_clip: float = 0.0, info: DistInfo | None = None, bf16: bool = False,
               timings: dict[str, float] | None = None) -> StepStats:
    """One optimiser step over `batches` (this rank's micro-batches, host tensors).

    The items of the whole step are counted first (host, then one all-reduce), so each
    micro-batch's summed loss is divided by the same number: the step optimises the mean over
    every item of every micro-batch and rank. FSDP averages gradients over ranks, hence the
    factor `world_size`. Without an optimiser only the gradients are left (what the tests compare).
    timings: when given, seconds spent in transfer / forward / backward / optimizer are added to it
    (the device is synchronised at each boundary, so only benchmarks ask for it).
    """
    info = info or DistInfo()
    device = info.device
    local_items = sum(objective.items(b) for b in batches)
    items = int(all_reduce_sum(local_items, info))
    if items == 0:
        raise UserError("a training step holds no labelled item (every label is -100): check the data and seq_len")
    scale = info.world_size / items
    tokens = crops = skipped = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    extras: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    for batch in batches:
        # counted on the host batch: no device sync
        tokens += count_tokens(batch.inputs)
        crops += count_crops(batch.inputs, unwrap(model).config)
        skipped += batch.skipped
        batch = Batch(_to(batch.inputs, device), batch.n_pairs, batch.skipped)
        t = _lap(timings, "transfer", t, device)
        with _autocast(device, bf16):
            loss, extra = objective(model, batch)
        t = _lap(timings, "forward", t, device)
        (loss * scale).backward()
        t = _lap(timings, "backward", t, device)
        loss_sum += loss.detach().double()
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + v.detach().double()
    loss_value = all_reduce_sum(loss_sum.item(), info) / items
    extra_values = {k: all_reduce_sum(float(v), info) / items for k, v in extras.items()}
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"the loss became {loss_value} (learning rate too high, or bad data?); "
                            "stopped before the update, the last checkpoint on disk is the last good one")
    grad_norm, lr = None, float("nan")
    if optimizer is not None:
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], grad_clip).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _lap(timings, "optimizer", t, device)
    return StepStats(loss_value, items, tokens, crops, skipped, grad_norm, lr, extra_values)


# -- evaluate ---------------------------------------------------------------------------------------


def evaluate(run: Run) -> dict[str, float]:
    """The objective on `eval_batches` fixed micro-batches drawn with another seed (RNG untouched)."""
    cfg, info, device = run.cfg, run.info, run.device
    ev = build_stream(cfg, run.manifest, run.processor, info, verify="none", seed_offset=1)
    model = run.model
    model.eval()
    loss_sum, items, extra_sum = 0.0, 0, {}
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(cfg.eval_batches):
            b = ev.next()
            items += run.objective.items(b)
            b = Batch(_to(b.inputs, device), b.n_pairs, b.skipped)
            with _autocast(device, run.bf16):
                loss, extra = run.objective(model, b)
            loss_sum += loss.item()
            for k, v in extra.items():
                extra_sum[f"eval_{k}"] = extra_sum.get(f"eval_{k}", 0.0) + v.item()
    model.train()
    n = max(1.0, all_reduce_sum(items, info))
    extras = {k: all_reduce_sum(v, info) / n for k, v in extra_sum.items()}
    return {"eval_loss": all_reduce_sum(loss_sum, info) / n, **extras}


# -- the stage --------------------------------------------------------------------------------------


def _checkpoint(run: Run, *, asynchronous: bool) -> None:
    """Checkpoint the run; `asynchronous`: the tensors are written while the next steps train
    (the previous checkpoint is finished first, so at most one is in flight)."""
    cfg = run.cfg
    _finish_checkpoint(run)
    run.pending = start_checkpoint(
        run.out, run.step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        data_state=run.stream.state_dict(), asynchronous=asynchronous,
        meta={"tokens": run.tokens, "run_id": run.run_id, "stage": cfg.stage, "config": cfg.source})
    if not asynchronous:
        _finish_checkpoint(run)


def _finish_checkpoint(run: Run) -> None:
    if run.pending is not None:
        run.pending.wait()
        run.pending = None


def train_stage(
    cfg: StageConfig,
    *,
    init_path: str | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    db: str | Path | None = None,
    dist_info: DistInfo | None = None,
    record: bool = True,
    data_vars: Mapping[str, str] | None = None,
) -> StageResult:
    """Run (or resume) one stage; stop early after `max_steps` total steps (a checkpoint is kept).

    data_vars: the `${VAR}`s of the mixture spec, as `train.prepare.prepare_data` returned them."""
    info = dist_info or init_distributed()
    if cfg.benchmarks.tasks:
        _benchmark_data(cfg)  # a missing benchmark file stops the stage now, not after training
    run = build_run(cfg, init_path=init_path, resume=resume, db=db, info=info, record=record, data_vars=data_vars)
    stop_at = min(run.steps_total, max_steps) if max_steps is not None else run.steps_total
    metrics = MetricsWriter(run.out, enabled=info.is_main, resume_from_step=run.step if run.resumed else None)
    flops = flops_model(unwrap(run.model))
    peak = peak_flops(run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    run.model.train()
    losses: list[float] = []
    skipped = 0
    try:
        with progress() as bar:
            task = bar.add_task(cfg.name, total=stop_at, completed=run.step)
            while run.step < stop_at:
                t0 = time.perf_counter()
                batches = [run.stream.next() for _ in range(cfg.batch.grad_accum)]
                data_wait = time.perf_counter() - t0
                s = train_step(run.model, run.objective, batches, optimizer=run.optimizer, scheduler=run.scheduler,
                               grad_clip=cfg.optim.grad_clip, info=info, bf16=run.bf16)
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                dt = time.perf_counter() - t0
                run.step += 1
                step_tokens_all = int(all_reduce_sum(s.tokens, info))
                run.tokens += step_tokens_all
                losses.append(s.loss)
                skipped += s.skipped
                if cfg.log_every and (run.step % cfg.log_every == 0 or run.step == stop_at):
                    row = {
                        "loss": s.loss, "lr": s.lr, "tokens": run.tokens, "tokens_per_s": step_tokens_all / dt,
                        "step_time_s": dt, "data_wait_s": data_wait, "grad_norm": s.grad_norm,
                        # samples dropped since the previous row (all ranks): longer than a packed row, or not encodable
                        "skipped": int(all_reduce_sum(skipped, info)),
                        "mfu": mfu(flops.step_flops(s.tokens, cfg.batch.seq_len, s.crops), dt, peak),
                        **s.extras,
                    }
                    if run.device.type == "cuda":
                        row["max_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
                    metrics.log(run.step, row)
                    skipped = 0
                if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == stop_at):
                    metrics.log(run.step, evaluate(run))
                bar.update(task, completed=run.step, description=f"{cfg.name} loss {s.loss:.3f}")
                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < stop_at:
                    _checkpoint(run, asynchronous=True)
    except NonFiniteLoss as e:
        _finish_checkpoint(run)  # every rank stops here (the loss is all-reduced): the last good one stays
        metrics.close()
        if record and info.is_main:
            result = StageResult(cfg.stage, cfg.name, run.out, None, run.step, run.tokens, None, losses, run.pinfo,
                                 run.run_id)
            _record(result, run, db=db, status=f"failed: non-finite loss at step {run.step + 1}")
        raise NonFiniteLoss(f"step {run.step + 1}: {e.args[0]}", field=cfg.name) from None
    metrics.close()
    return finish(run, losses, record=record, db=db)


def finish(run: Run, losses: list[float], *, record: bool, db) -> StageResult:
    """Final checkpoint; `final/` model dir when the stage ran to its end; catalog row."""
    cfg, info = run.cfg, run.info
    _checkpoint(run, asynchronous=False)
    last = losses[-1] if losses else None
    result = StageResult(cfg.stage, cfg.name, run.out, None, run.step, run.tokens, last, losses, run.pinfo, run.run_id)
    if run.step >= run.steps_total:
        from blip3.train.export import export_model

        result.final_dir = run.out / "final"
        about = {"run_id": run.run_id, "stage": cfg.stage, "name": cfg.name, "config": cfg.source,
                 "init": run.start_from, "steps": run.step, "tokens": run.tokens, "final_loss": last, **run.pinfo,
                 "lora": cfg.lora.enabled, "merged": cfg.lora.enabled and cfg.lora.merge}
        export_model(run.model, run.processor, result.final_dir, merge=cfg.lora.merge, info=info, about=about)
    if record and info.is_main:
        _record(result, run, db=db, status="finished" if result.final_dir else "stopped")
    if result.final_dir and cfg.benchmarks.tasks and info.is_main:
        _run_benchmarks(cfg, result.final_dir, db, info.device)
    return result


def _benchmark_data(cfg: StageConfig, *, check: bool = True) -> Path:
    """The stage's benchmark folder; with `check`, every task's files are read once (one line
    naming a missing file)."""
    import os

    from blip3.eval.tasks import get_task

    bm = cfg.benchmarks
    data = Path(bm.data or os.environ.get("BLIP3_EVAL_DATA") or "eval-data")
    for name in bm.tasks if check else ():
        task = get_task(name)
        task.load(data, "test")
        if bm.shots:
            task.load(data, "train")
    return data


def _run_benchmarks(cfg: StageConfig, final: Path, db, device: torch.device) -> None:
    """The stage file's `benchmarks`, on the exported model (rank 0; results go to the catalog)."""
    from blip3.eval.runner import evaluate

    bm = cfg.benchmarks
    evaluate(final, bm.tasks, data=_benchmark_data(cfg, check=False), out=final / "eval", shots=bm.shots, limit=bm.limit,
             batch_size=bm.batch_size, device=str(device), seed=cfg.seed, db=resolve_db(db),
             dist_info=DistInfo(device=device))  # rank 0 alone, whatever the world size


def _record(result: StageResult, run: Run, *, status: str, db=None) -> None:
    from blip3.core.catalog import Catalog

    cfg, manifest = run.cfg, run.manifest
    with Catalog(db) as cat:
        cat.record_run(
            run_id=result.run_id, stage=cfg.stage, kind="lora" if cfg.lora.enabled else "full",
            config_path=str(Path(cfg.source).resolve()) if cfg.source else None,
            manifest=str(Path(manifest).resolve()) if isinstance(manifest, (str, Path)) else manifest.name,
            started_at=run.started, finished_at=datetime.now(timezone.utc), steps=result.steps, tokens=result.tokens,
            final_loss=result.final_loss,
            checkpoint=str(result.final_dir.resolve()) if result.final_dir else None,
            status=status,
            metrics_path=str((result.output_dir / "metrics.jsonl").resolve()),
        )
