"""The training loop of one stage: read it top to bottom.

    build (model, processor, optimiser, schedule, data) -> resume? -> parallelize ->
    for each step: grad_accum x (batch -> forward under autocast -> loss / accum -> backward)
                   -> clip -> optimiser step -> schedule step -> log -> checkpoint every N
    -> final checkpoint + `final/` model dir -> catalog row

The loss depends on the stage: next-token cross-entropy (labels already -100 outside the trained
tokens: images, padding, user turns, the first token of each packed segment), or for `dpo` the
DPO objective of the policy against the adapter-disabled reference (`train.dpo`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from blip3.core.catalog import resolve_db
from blip3.core.errors import UserError
from blip3.core.logs import get_logger, progress
from blip3.train.builders import build_model, build_optimizer, resolve_manifest, unwrap
from blip3.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from blip3.train.config import StageConfig
from blip3.train.data import Batch, BatchStream, check_kinds, count_crops, count_tokens
from blip3.train.distributed import DistInfo, all_reduce_mean, all_reduce_sum, init_distributed, parallelize
from blip3.train.dpo import dpo_loss, sequence_logps
from blip3.train.export import export_model
from blip3.train.metrics import MetricsWriter
from blip3.model.flops import flops_model, mfu, peak_flops
from blip3.train.schedule import build_scheduler

log = get_logger("train")
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "segment_ids")


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


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items() if k in MODEL_KEYS and v is not None}


def compute_loss(model, batch: Batch, stage: str, beta: float) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch and its extra metrics (dpo: reward margin and accuracy)."""
    # no KV cache in training: a recomputed (activation-checkpointed) block would append to it twice
    inputs = {**batch.inputs, "use_cache": False}
    if stage != "dpo":
        return model(**inputs).loss, {}
    labels = inputs["labels"]
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    logps = sequence_logps(model(**fwd).logits, labels)
    with torch.no_grad(), model.disable_adapter():  # the reference: the same model, adapters off
        ref = sequence_logps(model(**fwd).logits, labels)
    p = batch.n_pairs
    out = dpo_loss(logps[:p], logps[p:], ref[:p], ref[p:], beta)
    acc = (out.chosen_rewards > out.rejected_rewards).float().mean()
    return out.loss, {"margin": out.margin.item(), "reward_acc": acc.item()}


def total_steps(cfg: StageConfig, world_size: int) -> int:
    """Optimiser steps of the stage; a token budget is converted at full rows of seq_len."""
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch.micro_batch_size * cfg.batch.seq_len * cfg.batch.grad_accum * world_size
    return max(1, math.ceil(cfg.tokens / per_step))


def train_stage(
    cfg: StageConfig,
    *,
    init_path: str | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    db: str | Path | None = None,
    dist_info: DistInfo | None = None,
    record: bool = True,
) -> StageResult:
    """Run (or resume) one stage; stop early after `max_steps` total steps (a checkpoint is kept)."""
    from blip3.mixture.loader import MixtureLoader

    info = dist_info or init_distributed()
    if info.distributed and not cfg.runtime.fsdp:
        # without FSDP nothing synchronises gradients: each rank would train its own copy
        raise UserError(f"{info.world_size} ranks need `runtime.fsdp: true` (there is no other data-parallel "
                        "wrapper); run one process or enable it", field="runtime.fsdp", file=cfg.source)
    device = info.device
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

    # -- build ---------------------------------------------------------------------------------
    # recorded runs also record their mixture, so `blip3 sql` joins runs to mixtures and sources
    manifest = resolve_manifest(cfg, out, resolve_db(db) if record else None, info.is_main)
    if info.distributed:
        torch.distributed.barrier()
    loader = MixtureLoader(manifest, rank=info.rank, world_size=info.world_size,
                           shuffle_buffer=cfg.data.shuffle_buffer, verify="size")
    check_kinds(cfg.stage, loader.manifest, cfg.source)
    # build_model seeds with init.seed (the same weights on every rank); the fork keeps the stream
    # of cfg.seed + rank for what follows (noise, dropout)
    with torch.random.fork_rng(devices=[]):
        model, processor, pinfo = build_model(cfg, init_path)
    if cfg.lora.enabled:
        log.info(f"{cfg.name}: LoRA r={cfg.lora.rank} trains {pinfo['trainable_params']:,} of {pinfo['params']:,} "
                 f"parameters ({100 * pinfo['trainable_share']:.2f}%)")
    model.to(device)
    base = unwrap(model)
    flops = flops_model(base)
    steps_total = total_steps(cfg, info.world_size)
    stop_at = min(steps_total, max_steps) if max_steps is not None else steps_total
    stream = BatchStream(loader, processor, stage=cfg.stage, micro_batch_size=cfg.batch.micro_batch_size,
                         seq_len=cfg.batch.seq_len, pack=cfg.batch.pack,
                         noised_image_chosen_as_rejected=cfg.dpo.noised_image_chosen_as_rejected, noise_std=cfg.dpo.noise_std)
    model = parallelize(model, ac=cfg.runtime.activation_checkpointing, compile=cfg.runtime.compile,
                        fsdp=info.distributed, bf16=bf16)
    # the optimiser holds the parameters as FSDP2 leaves them (sharded DTensors): build it after
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, steps_total, cfg.optim.min_lr_ratio)

    step, tokens, run_id = 0, 0, f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    started = datetime.now(timezone.utc)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        stream.load_state_dict(meta["data"])
        step, tokens, run_id = meta["step"], meta["tokens"], meta.get("run_id", run_id)
        log.info(f"{cfg.name}: resumed from {ckpt} at step {step}")
    metrics = MetricsWriter(out, enabled=info.is_main, resume_from_step=step if ckpt is not None else None)
    peak = peak_flops(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # -- loop ----------------------------------------------------------------------------------
    def checkpoint(at: int) -> None:
        save_checkpoint(out, at, model=model, optimizer=optimizer, scheduler=scheduler,
                        data_state=stream.state_dict(),
                        meta={"tokens": tokens, "run_id": run_id, "stage": cfg.stage, "config": cfg.source})

    def evaluate() -> dict:
        """Mean loss on `eval_batches` fixed micro-batches drawn with another seed (RNG untouched)."""
        ev = BatchStream(MixtureLoader(manifest, seed=loader.seed + 1, rank=info.rank, world_size=info.world_size,
                                       shuffle_buffer=cfg.data.shuffle_buffer, verify="none"),
                         processor, stage=cfg.stage, micro_batch_size=cfg.batch.micro_batch_size,
                         seq_len=cfg.batch.seq_len, pack=cfg.batch.pack)
        model.eval()
        total, extra_sum = 0.0, {}
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(cfg.eval_batches):
                b = ev.next()
                b.inputs = _to(b.inputs, device)
                with _autocast(device, bf16):
                    loss, extra = compute_loss(model, b, cfg.stage, cfg.dpo.beta)
                total += loss.item() / cfg.eval_batches
                for k, v in extra.items():
                    extra_sum[f"eval_{k}"] = extra_sum.get(f"eval_{k}", 0.0) + v / cfg.eval_batches
        model.train()
        return {"eval_loss": all_reduce_mean(total, info), **{k: all_reduce_mean(v, info) for k, v in extra_sum.items()}}

    model.train()
    losses: list[float] = []
    last_loss, skipped = None, 0
    with progress() as bar:
        task = bar.add_task(cfg.name, total=stop_at, completed=step)
        while step < stop_at:
            t0 = time.perf_counter()
            step_tokens, step_crops, step_loss, extras = 0, 0, 0.0, {}
            for _ in range(cfg.batch.grad_accum):
                batch = stream.next()
                # counted on the host batch: no device sync
                step_tokens += count_tokens(batch.inputs)
                step_crops += count_crops(batch.inputs, base.config)
                skipped += batch.skipped
                batch.inputs = _to(batch.inputs, device)
                with _autocast(device, bf16):
                    loss, extra = compute_loss(model, batch, cfg.stage, cfg.dpo.beta)
                (loss / cfg.batch.grad_accum).backward()
                step_loss += loss.item() / cfg.batch.grad_accum
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + v / cfg.batch.grad_accum
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
                ).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            step_loss = all_reduce_mean(step_loss, info)
            step_tokens_all = int(all_reduce_sum(step_tokens, info))
            tokens += step_tokens_all
            losses.append(step_loss)
            last_loss = step_loss
            if cfg.log_every and (step % cfg.log_every == 0 or step == stop_at):
                row = {
                    "loss": step_loss, "lr": lr, "tokens": tokens, "tokens_per_s": step_tokens_all / dt,
                    "step_time_s": dt, "grad_norm": grad_norm,
                    # samples longer than a packed row, dropped since the previous row (all ranks)
                    "skipped": int(all_reduce_sum(skipped, info)),
                    "mfu": mfu(flops.step_flops(step_tokens, cfg.batch.seq_len, step_crops), dt, peak),
                    **{k: all_reduce_mean(v, info) for k, v in extras.items()},
                }
                if device.type == "cuda":
                    row["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                metrics.log(step, row)
                skipped = 0
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == stop_at):
                metrics.log(step, evaluate())
            bar.update(task, completed=step, description=f"{cfg.name} loss {step_loss:.3f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop_at:
                checkpoint(step)
    metrics.close()
    checkpoint(step)

    result = StageResult(cfg.stage, cfg.name, out, None, step, tokens, last_loss, losses, pinfo, run_id)
    if step >= steps_total:
        result.final_dir = out / "final"
        about = {"run_id": run_id, "stage": cfg.stage, "name": cfg.name, "config": cfg.source, "init": start_from,
                 "steps": step, "tokens": tokens, "final_loss": last_loss, **pinfo,
                 "lora": cfg.lora.enabled, "merged": cfg.lora.enabled and cfg.lora.merge}
        export_model(model, processor, result.final_dir, merge=cfg.lora.merge, info=info, about=about)
    if record and info.is_main:
        _record(result, cfg, started, manifest, db)
    return result


def _record(result: StageResult, cfg: StageConfig, started: datetime, manifest, db) -> None:
    from blip3.core.catalog import Catalog

    with Catalog(db) as cat:
        cat.record_run(
            run_id=result.run_id, stage=cfg.stage, kind="lora" if cfg.lora.enabled else "full",
            config_path=str(Path(cfg.source).resolve()) if cfg.source else None,
            manifest=str(Path(manifest).resolve()) if isinstance(manifest, (str, Path)) else manifest.name,
            started_at=started, finished_at=datetime.now(timezone.utc), steps=result.steps, tokens=result.tokens,
            final_loss=result.final_loss,
            checkpoint=str(result.final_dir.resolve()) if result.final_dir else None,
            status="finished" if result.final_dir else "stopped",
            metrics_path=str((result.output_dir / "metrics.jsonl").resolve()),
        )
