"""Trainer benchmark: tokens/s, MFU and peak memory of training steps; the tiny chain's wall time.

    python benchmarks/bench_train.py                       # CPU: tiny model, tiny chain
    python benchmarks/bench_train.py --config phi3-mini    # GPU: phi3-mini size, bf16, dense vs flex

Each row times the trainer's own optimiser step (`train.loop.train_step`: host-to-device copy,
forward under autocast, backward, clip, AdamW) on synthetic batches shaped like the stages'
batches, after warm-up steps, with the loss from chunked label log-probs or full logits, each
decoder block compiled or not (`runtime.compile`), packed attention through the dense 4D mask or
a FlexAttention block mask (`runtime.attention`; GPU only, torch has no CPU backward for it), and the
step split into transfer / forward / backward / optimiser (timed in extra synchronised steps):
- pretrain: `micro_batch` rows of `seq_len` tokens, packed (`segment_ids`), 4 samples per row,
  one 1-crop image each (num_latents image tokens);
- sft: `micro_batch` rows, one any-res image of 5 crops each (640 image tokens at phi3-mini
  size), loss on the second half of each row (the answer).
Weights are random (no download): speed does not depend on their values.

MFU = model FLOPs per step / step time / peak bf16 dense FLOP/s of the GPU (model.flops: 6N per
trained LLM/resampler parameter per token, 12*L*d*T attention with T the packed row (`MFU`) or
each token's own segment (`MFU seg`, pretrain rows hold 4 segments), 2N per frozen ViT parameter per
patch token; H100/H200 SXM peak 989 TFLOP/s). Activation-checkpoint recompute is not counted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_mb, report  # noqa: E402


def synthetic_batch(config, kind: str, rows: int, seq_len: int, device):
    """Random ids with image placeholder runs where images go, and matching pixel values."""
    import torch

    from blip3.model.anyres import plan_crops

    g = torch.Generator().manual_seed(0)
    vocab, ph, L, S = config.lang_model["vocab_size"], config.image_placeholder_id, config.num_latents, config.image_size
    ids = torch.randint(10, min(vocab, 32000), (rows, seq_len), generator=g)
    ids[ids == ph] = 11
    labels = ids.clone()
    out = {}
    if kind == "pretrain":
        seg = torch.zeros(rows, seq_len, dtype=torch.long)
        per = seq_len // 4
        for r in range(rows):
            for k in range(4):
                seg[r, k * per:(k + 1) * per] = k + 1
                ids[r, k * per + 1:k * per + 1 + L] = ph
        out["segment_ids"] = seg
        pv = torch.randn(rows * 4, 1, 3, S, S, generator=g)
    else:
        size = (2 * S, 2 * S)  # best fit: the 2x2 grid -> base + 4 crops
        n_crops = plan_crops(size, config.anyres_grids, S).n_crops
        for r in range(rows):
            ids[r, 1:1 + n_crops * L] = ph
        labels[:, : seq_len // 2] = -100
        out["attention_mask"] = torch.ones(rows, seq_len, dtype=torch.long)
        out["image_sizes"] = torch.tensor([size] * rows)
        pv = torch.randn(rows, n_crops, 3, S, S, generator=g)
    labels[ids == ph] = -100
    out.update(input_ids=ids, labels=labels, pixel_values=pv)
    return {k: v.to(device) for k, v in out.items()}


def time_steps(config_name: str, kind: str, rows: int, seq_len: int, steps: int, warmup: int, *, ac: bool,
               compile: bool, threads: int | None, loss: str = "chunked", attention: str = "dense") -> dict:
    import torch

    from blip3.model.attention import set_attention
    from blip3.model.config import get_config
    from blip3.model.xgenmm import XGenMM
    from blip3.model.runtime import DistInfo
    from blip3.train.distributed import parallelize
    from blip3.model.flops import attended_positions, flops_model, mfu, peak_flops
    from blip3.train.data import Batch, count_crops, count_tokens
    from blip3.train.loop import train_step
    from blip3.train.objective import CrossEntropy

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    config = get_config(config_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = XGenMM(config)
    model.vision_encoder.requires_grad_(False)
    set_attention(model.lang_model, attention)
    model.train()
    parallelize(model, ac=ac, compile=compile, fsdp=False, bf16=bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    # host batch, moved by the trainer's own step (pinned memory, non-blocking copy on a GPU)
    batch = synthetic_batch(config, kind, rows, seq_len, torch.device("cpu"))
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    tokens, crops = count_tokens(batch), count_crops(batch, config)
    objective = CrossEntropy(placeholder_id=config.image_placeholder_id, impl=loss)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    fm = flops_model(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(timings=None):
        # the trainer's step: objective normalised by the step's labelled tokens, clip, AdamW
        train_step(model, objective, [Batch(batch)], optimizer=opt, scheduler=sched, grad_clip=1.0, bf16=bf16,
                   info=DistInfo(device=device), timings=timings)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    cpu_s = (time.process_time() - c0) / steps  # load-independent on a shared CPU box
    split: dict[str, float] = {}
    for _ in range(max(1, steps // 2)):  # the split, timed apart: its synchronisations slow a step down
        step(split)
    total = sum(split.values()) or 1.0
    flops = fm.step_flops(tokens, seq_len, crops)
    util = mfu(flops, dt, peak_flops(device))
    # attention over each packed segment only (what a block-diagonal kernel must compute)
    seg = batch.get("segment_ids")
    seg_flops = flops if seg is None else fm.step_flops(tokens, seq_len, crops, attended_positions(seg))
    util_seg = mfu(seg_flops, dt, peak_flops(device))
    return {
        "config": config_name, "batch": kind, "device": torch.cuda.get_device_name() if bf16 else f"cpu x{torch.get_num_threads()}",
        "rows x seq": f"{rows}x{seq_len}", "attention": attention, "compile": "on" if compile else "off",
        "step s": dt, "CPU s/step": cpu_s, "tokens/s": tokens / dt, "TFLOP/s": flops / dt / 1e12,
        "MFU": "n/a (CPU)" if util is None else f"{100 * util:.1f}%",
        "MFU seg": "n/a (CPU)" if util_seg is None else f"{100 * util_seg:.1f}%",
        "peak mem GB": torch.cuda.max_memory_allocated() / 2**30 if bf16 else peak_rss_mb() / 1024,
        "loss": loss,
        "split data/fwd/bwd/optim %": "/".join(f"{100 * split.get(k, 0.0) / total:.0f}"
                                             for k in ("transfer", "forward", "backward", "optimizer")),
    }


def tiny_chain_wall() -> dict:
    import os

    from blip3.train.config import load_any
    from blip3.train.pipeline import run_pipeline

    os.environ["BLIP3_NO_PROGRESS"] = "1"
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        results = run_pipeline(load_any(root / "manifests/tiny/pipeline.yaml"), out_root=d, db=Path(d) / "c.duckdb")
        wall = time.perf_counter() - t0
    steps = sum(r.steps for r in results)
    tokens = sum(r.tokens for r in results)
    return {"config": "tiny", "batch": "5-stage chain", "device": "cpu x1", "rows x seq": f"{steps} steps",
            "attention": "dense", "compile": "off", "step s": wall / steps, "CPU s/step": float("nan"),
            "tokens/s": tokens / wall, "TFLOP/s": float("nan"), "MFU": f"wall {wall:.1f}s", "MFU seg": "",
            "peak mem GB": peak_rss_mb() / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="tiny (CPU default) or phi3-mini (GPU default)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--pretrain-rows", type=int, default=None)
    ap.add_argument("--sft-rows", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder block")
    ap.add_argument("--compile", default="both", choices=["off", "on", "both"],
                    help="torch.compile per decoder block (both: rows without and with, chunked loss)")
    ap.add_argument("--attention", default=None, choices=["dense", "flex", "both"],
                    help="packed attention: dense 4D mask or FlexAttention block mask (default: both on a GPU; "
                         "dense on CPU, where FlexAttention has no backward)")
    ap.add_argument("--kinds", default="pretrain,sft", help="batch kinds to time, comma-separated")
    ap.add_argument("--no-chain", action="store_true", help="skip the tiny chain's wall time")
    ap.add_argument("--loss", default="both", choices=["chunked", "dense", "both"],
                    help="label log-probs chunk by chunk (the trainer's default) or from full logits")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    name = args.config or ("phi3-mini" if gpu else "tiny")
    big = name != "tiny"
    steps = args.steps or (10 if big else 20)
    warmup = args.warmup if args.warmup is not None else (3 if big else 2)
    seq = args.seq_len or (2048 if big else 256)
    attention = args.attention or ("both" if gpu else "dense")
    if not gpu and attention != "dense":
        ap.error("--attention flex needs a GPU (torch has no FlexAttention backward on CPU)")
    losses = ["chunked", "dense"] if args.loss == "both" else [args.loss]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    attentions = ["dense", "flex"] if attention == "both" else [attention]
    # (loss, compile, attention): every loss plainly; compile and flex on the first loss only
    variants = [(loss, False, "dense") for loss in losses] if False in compiles and "dense" in attentions else []
    variants += [(losses[0], c, a) for a in attentions for c in compiles if (c, a) != (False, "dense")]
    rows = []
    kinds = {"pretrain": args.pretrain_rows or (4 if big else 2), "sft": args.sft_rows or (4 if big else 2)}
    for kind in args.kinds.split(","):
        if kind not in kinds:
            ap.error(f"--kinds: unknown kind {kind!r} (pretrain, sft)")
        n = kinds[kind]
        for threads in ([None] if gpu else [1, 2]):
            for loss, compile, attn in variants:
                rows.append(time_steps(name, kind, n, seq, steps, warmup, ac=args.ac or big, compile=compile,
                                       threads=threads, loss=loss, attention=attn))
    if not gpu and not args.no_chain:
        rows.append(tiny_chain_wall())
    report("bench_train", rows, f"training throughput ({name})")


if __name__ == "__main__":
    main()
