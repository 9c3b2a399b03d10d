"""Grounding datagen benchmark: the full Ray pipeline vs a bare detector loop, 1 vs 2 workers, memory.

Random-weight Grounding DINO models are built on the spot (speed does not depend on the weights):
`small` (CPU-sized: small Swin, 2+2 layers, 320 px) or `gdino-tiny` (the
`IDEA-Research/grounding-dino-tiny` architecture: Swin-T, BERT-base-sized text encoder, 6+6 layers,
900 queries, 800 px; use it on a GPU). Inputs are N rendered 640x480 scenes with captions.

    python benchmarks/bench_grounding.py [--size small|gdino-tiny] [--images 48] [--shard-size 6] [--device cpu|cuda]

Rows:
- bare loop: `HFGroundingDino.detect` + post-filter on pre-decoded images in this process, torch
  limited to one thread (as in a Ray actor with one CPU) — the engine's own cost; run before, between
  and after the pipeline runs, the median is used (on a shared machine the load changes);
- pipeline w=1 / w=2: `datagen.grounding.ground` (read, decode, detect, 6 captions, shard + parquet
  write, no catalog) on a local Ray started beforehand (start-up reported apart);
- `total` includes the fixed start-up of a job (actor processes importing torch and loading the
  model, Ray Data planning); `steady` is the rate once actors are up: images of shards 2..n over
  the time between the first and the last shard's publication (`finished_at` in the stats files).
  Rows reach the driver in Ray Data blocks, so the first publication can lag its compute and
  `steady` reads high on short runs: use enough images that `total` is the figure to trust;
- ratios: time per image vs the bare loop's, and w=2 / w=1 steady throughput;
- peak memory: peak RSS of this process (bare loop) and peak summed RSS of the process tree
  (driver + raylet + workers) sampled every 0.2 s during each pipeline run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import TreeMonitor, peak_rss_mb, report  # noqa: E402
from blip3.datagen.pipeline import JobOptions  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "the", "red", "blue", "green", "circle", "square",
         "ball", "dog", "tree", "car", "sky", "person", "field", "on", "next", "to", "and", "white", "wall"]
TAGS = ["red circle", "blue square", "green ball", "dog", "tree", "car", "person", "sky"]


def build_model(out: Path, size: str) -> tuple[Path, int]:
    """A random Grounding DINO of the given size, saved with its processor; (dir, parameter count)."""
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True, model_max_length=256)
    if size == "gdino-tiny":
        backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                              out_features=["stage2", "stage3", "stage4"])
        text = BertConfig()  # bert-base-uncased dimensions
        config = GroundingDinoConfig(backbone_config=backbone, text_config=text)
        image_size = {"shortest_edge": 800, "longest_edge": 1333}
    else:
        backbone = SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
                              out_features=["stage2", "stage3", "stage4"])
        text = BertConfig(vocab_size=len(WORDS), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=256)
        config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=128, encoder_layers=2,
                                     decoder_layers=2, encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=100,
                                     encoder_attention_heads=4, decoder_attention_heads=4)
        image_size = {"shortest_edge": 320, "longest_edge": 480}
    model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(out)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=image_size),
                           tokenizer=tokenizer).save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def write_images(folder: Path, n: int) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True)
    colours = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
    for i in range(n):
        img = Image.new("RGB", (640, 480), (245, 245, 245))
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x, y, s = rng.randint(0, 500), rng.randint(0, 340), rng.randint(40, 140)
            d.ellipse((x, y, x + s, y + s), fill=rng.choice(list(colours.values())))
        img.save(folder / f"img_{i:04d}.jpg", quality=90)
        (folder / f"img_{i:04d}.txt").write_text("a red circle next to a blue square on a white wall")


def steady_rate(out: Path) -> float:
    """Images/s between the first and the last shard publication: the rate once actors are up."""
    import json

    stats = sorted((json.loads(p.read_text()) for p in out.glob("*_stats.json")), key=lambda s: s["finished_at"])
    if len(stats) < 2:
        raise SystemExit("steady rate needs at least 2 shards: use more --images or a smaller --shard-size")
    images = sum(s["count"] for s in stats[1:])
    return images / (stats[-1]["finished_at"] - stats[0]["finished_at"])


def bare_loop(model_dir: Path, images: Path, device: str | None) -> float:
    import torch
    from PIL import Image

    from blip3.datagen.detectors import DetectionLimits, filter_objects
    from blip3.datagen.detectors_gdino import HFGroundingDino

    torch.set_num_threads(1)
    det = HFGroundingDino(model_dir, device)
    det.load()
    decoded = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.jpg"))]
    limits = DetectionLimits()
    det.detect(decoded[0], TAGS, limits)  # warm-up, as the pipeline's actors warm up on their first batch
    t = time.perf_counter()
    for im in decoded:
        filter_objects(det.detect(im, TAGS, limits), limits)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["small", "gdino-tiny"], default="small")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--shard-size", type=int, default=6)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--detector-only", action="store_true",
                    help="only the bare detector loop (no Ray needed): the engine's per-device rate")
    args = ap.parse_args()

    import os

    os.environ.setdefault("BLIP3_NO_PROGRESS", "1")
    if args.detector_only:
        return detector_only(args)
    import ray

    from blip3.datagen.grounding import ground, make_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, n_params = build_model(tmp / f"gdino-{args.size}", args.size)
        write_images(tmp / "images", args.images)
        (tmp / "vocab.txt").write_text("\n".join(TAGS) + "\n")
        config = make_config(tags="vocab", vocab=tmp / "vocab.txt", model=model_dir, device=args.device)
        bare_runs = [bare_loop(model_dir, tmp / "images", args.device)]
        bare_peak = peak_rss_mb()
        t = time.perf_counter()
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
        on_gpu = (args.device or ("cuda" if _cuda() else "cpu")).startswith("cuda")
        gpus = 0.5 if on_gpu else 0.0  # two actors share one GPU
        # a throwaway job first: the driver's one-time Ray Data set-up is not a per-job cost
        ground(tmp / "images", tmp / "warmup", config,
               JobOptions(workers=1, register=False, gpus_per_worker=gpus, limit=2))
        steady: dict[int, float] = {}
        rows: list[dict] = []
        for workers in (1, 2):
            out = tmp / f"out_w{workers}"
            with TreeMonitor(interval=0.2) as mem:
                t = time.perf_counter()
                r = ground(tmp / "images", out, config,
                           JobOptions(workers=workers, shard_size=args.shard_size, register=False, gpus_per_worker=gpus))
                total = time.perf_counter() - t
            assert r.successes == args.images, r
            steady[workers] = steady_rate(out)
            rows.append({"run": f"pipeline w={workers}, total", "images": args.images, "seconds": total,
                         "images/s": args.images / total, "vs bare": 0.0, "peak MB": mem.tree / 2**20})
            bare_runs.append(bare_loop(model_dir, tmp / "images", args.device))  # interleaved with the pipeline runs
            rows.append({"run": f"pipeline w={workers}, steady", "images": args.images, "seconds": 0.0,
                         "images/s": steady[workers], "vs bare": 0.0, "peak MB": mem.tree / 2**20})
        ray.shutdown()
        bare_s = statistics.median(bare_runs)  # the machine may be shared: the median of 3 interleaved runs
    rows.insert(0, {"run": "bare detector loop (1 thread)", "images": args.images, "seconds": bare_s,
                    "images/s": args.images / bare_s, "vs bare": 1.0, "peak MB": bare_peak})
    for r in rows[1:]:  # time per image relative to the bare loop's (>1: slower than bare)
        r["vs bare"] = (args.images / bare_s) / r["images/s"]
    rows.append({"run": "2 workers vs 1 (steady throughput)", "images": args.images, "seconds": 0.0,
                 "images/s": 0.0, "vs bare": steady[2] / steady[1], "peak MB": 0.0})
    rows.append({"run": "ray start-up (not in rows above)", "images": 0, "seconds": ray_start,
                 "images/s": 0.0, "vs bare": 0.0, "peak MB": 0.0})
    device = "cuda" if gpus else "cpu"
    title = f"grounding datagen: {args.size} ({n_params / 1e6:.1f}M params) on {device}, {os.cpu_count()} CPUs"
    path = report("bench_grounding", rows, title)
    print(f"wrote {path}")


def detector_only(args) -> None:
    """The bare detector loop, three times (median), on the chosen device: images/s per device."""
    import torch

    device = args.device or ("cuda" if _cuda() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, n_params = build_model(tmp / f"gdino-{args.size}", args.size)
        write_images(tmp / "images", args.images)
        runs = [bare_loop(model_dir, tmp / "images", device) for _ in range(3)]
    s = statistics.median(runs)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu x1"
    row = {"run": "bare detector loop", "device": name, "images": args.images, "seconds": s,
           "images/s": args.images / s, "peak MB": peak_rss_mb(),
           "peak GPU GB": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0}
    report("bench_grounding", [row], f"grounding detector: {args.size} ({n_params / 1e6:.1f}M params) on {name}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
