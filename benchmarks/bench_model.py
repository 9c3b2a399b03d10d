"""Forward+backward throughput of the xGen-MM model, with MFU on a GPU.

CPU (default): the tiny config, float32 — tokens/s and achieved GFLOP/s.
GPU: `--device cuda --config phi3-mini --dtype bf16` — the real-size model with random weights:
tokens/s, MFU and peak memory at 1, 2 and 5 crops per image.

Each row is a batch of `--batch` sequences of `--seq-len` tokens: BOS, one image (crops x
num_latents placeholder tokens) and random text filling the rest. Crops are passed without
image_sizes (all crops used, unmasked), so any crop count can be measured. FLOPs follow
model/flops.py (nanoGPT-style: 6N per token for the trained weights, 4N for frozen ones + attention;
resampler matmuls x3 when trained; frozen ViT 2N per patch token, forward only); MFU is
`model.flops.mfu` against `model.flops.peak_flops` of the GPU (or `--peak-tflops`).

    python benchmarks/bench_model.py
    python benchmarks/bench_model.py --device cuda --config phi3-mini --dtype bf16 --batch 4 --grad-ckpt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Measured here: without an explicit OpenMP thread count, CPU steps with several crops per image
# ran ~10x slower (thread pools oversubscribing 2 cores). Set it before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_mb, report  # noqa: E402
from blip3.model.config import get_config  # noqa: E402
from blip3.model.flops import mfu, peak_flops, step_flops  # noqa: E402
from blip3.model.xgenmm import XGenMM  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_batch(cfg, batch: int, seq_len: int, crops: int, device: str) -> dict[str, torch.Tensor]:
    n_img = crops * cfg.num_latents
    if 1 + n_img >= seq_len:
        raise SystemExit(f"--seq-len {seq_len} too short for {crops} crops ({n_img} image tokens)")
    vocab = cfg.lang_model["vocab_size"]
    ids = torch.randint(100, min(vocab, 32000), (batch, seq_len))
    ids[:, 0] = cfg.lang_model.get("bos_token_id", 1)
    ids[:, 1 : 1 + n_img] = cfg.image_placeholder_id
    S = cfg.image_size
    return {
        "input_ids": ids.to(device),
        "labels": ids.to(device),
        "pixel_values": torch.randn(batch, crops, 3, S, S, device=device),
    }


def build(config_name: str, device: str, dtype: torch.dtype, grad_ckpt: bool) -> XGenMM:
    cfg = get_config(config_name)
    torch.manual_seed(0)
    with torch.device(device):  # build where it runs: no 16 GB of random init on the host
        model = XGenMM(cfg)
    model = model.to(dtype).train()
    if grad_ckpt:
        model.lang_model.gradient_checkpointing_enable()
        model.lang_model.config.use_cache = False
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model: XGenMM, batch: dict, steps: int, warmup: int, device: str) -> float:
    """Median seconds per forward+backward step over `steps` after `warmup` (the median keeps
    a shared machine's hiccups out of the figure)."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="tiny", choices=["tiny", "phi3-mini"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--crops", default="1,2,5", help="crops per image, comma-separated")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 cpu / 4 cuda)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256 tiny / 2048 phi3-mini")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the LLM")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU (default: model.flops.peak_flops of the GPU, or $BLIP3_PEAK_TFLOPS)")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    batch_size = args.batch or (4 if cuda else 8)
    seq_len = args.seq_len or (256 if args.config == "tiny" else 2048)
    model = build(args.config, args.device, DTYPES[args.dtype], args.grad_ckpt)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch.device(args.device))
    cfg = model.config
    rows = []
    for crops in (int(c) for c in args.crops.split(",")):
        batch = make_batch(cfg, batch_size, seq_len, crops, args.device)
        batch["pixel_values"] = batch["pixel_values"].to(DTYPES[args.dtype])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dt = measure(model, batch, args.steps, args.warmup, args.device)
        tokens = batch_size * seq_len
        flops = step_flops(model, tokens=tokens, seq_len=seq_len, crops=batch_size * crops)
        row = {
            "crops/img": crops,
            "batch": batch_size,
            "seq_len": seq_len,
            "image_tokens/seq": crops * cfg.num_latents,
            "step_s": dt,
            "tokens/s": round(tokens / dt),
            "vit_share": flops.vit / flops.total,
            "achieved_TFLOPs": flops.total / dt / 1e12,
        }
        if cuda:
            row["MFU"] = mfu(flops.total, dt, peak)
            row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["peak_rss_MB"] = peak_rss_mb()
        rows.append(row)
    name = f"bench_model_{args.config}_{'cuda' if cuda else 'cpu'}_{args.dtype}"
    where = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    vs = f", MFU vs {peak / 1e12:g} TFLOPs peak" if cuda and peak else ""
    report(name, rows, title=f"xGen-MM fwd+bwd, {args.config} {args.dtype} on {where}{vs}")


if __name__ == "__main__":
    main()
