"""Recaptioning benchmark: the VLM stage vs a bare batched `generate` loop, the batching curve, and
(on a GPU) tokens/s and images/s per GPU of both stages.

Random-weight LLaVA models are built on the spot (speed does not depend on the weights):
- `tiny` (CPU): a 2-layer CLIP tower and a 2-layer Llama, hidden 32 (the tests' model);
- `small`: CLIP ViT-B/16 at 224 px + a 16-layer Llama, hidden 2048 (about 1.2B parameters);
- `base`: the LLaVA-1.5-7B shapes, CLIP ViT-L/14 at 336 px + a Llama-2-7B-sized LM.
The merge LLM is the same Llama alone. Inputs are N rendered images with alt-texts.

    python benchmarks/bench_recaption.py [--size tiny] [--images 64] [--batch-size 8] [--max-new-tokens 32]
    python benchmarks/bench_recaption.py --device cuda --size small|base [--backend transformers|vllm]

Rows:
- bare loop: the model's processor + `generate` on the pre-decoded images, `--batch-size` images a
  call, greedy, in this process (torch limited to one thread on CPU, as in a one-CPU Ray actor);
- stage: `RecaptionAnnotator.annotate_batch` (VLM only, then VLM + merge LLM) on the same images
  and batch size: prompts, decoding, scores and records included;
- `vs bare`: the bare loop's CPU seconds over the stage's, bare and stage run alternately three
  times in one process and the medians compared (>= 0.9 means the stage costs at most 11% more);
  on a GPU the ratio is of wall seconds (the GPU does the work);
- the batching curve: stage images/s at batch 1, 2, 4, ... up to `--max-batch`, each on
  min(N, max(8 x batch, 16)) images (the rate is what is measured; batch 1 on N images would
  take long on a GPU at a real size);
- tokens/s counts the tokens generated (the models are random: they rarely stop before
  `--max-new-tokens`, so this is the engine's rate at that length).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_mb, report  # noqa: E402

SIZES = {
    # vision (image, patch, hidden, inter, layers, heads), text (hidden, inter, layers, heads, vocab)
    "tiny": ((32, 8, 32, 64, 2, 2), (32, 64, 2, 2, 512)),
    "small": ((224, 16, 768, 3072, 12, 12), (2048, 5632, 16, 16, 32000)),
    "base": ((336, 14, 1024, 4096, 24, 16), (4096, 11008, 32, 32, 32000)),
}
ALT = ["Eiffel Tower at night, Paris 2019", "", "Barack Obama visits Berlin", "A red circle by Acme Corp"]


def build_models(root: Path, size: str, device: str) -> tuple[Path, Path, int]:
    """Save a random LLaVA (`root/vlm`) and its Llama alone (`root/llm`); returns their parameters."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from blip3.model.tokenizer import train_tiny_tokenizer

    (img, patch, vh, vi, vl, vn), (th, ti, tl, tn, vocab) = SIZES[size]
    tok = train_tiny_tokenizer(512)
    text = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=th, intermediate_size=ti, num_hidden_layers=tl,
                       num_attention_heads=tn, num_key_value_heads=tn, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(image_size=img, patch_size=patch, hidden_size=vh, intermediate_size=vi,
                              num_hidden_layers=vl, num_attention_heads=vn)
    n_patches = (img // patch) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=n_patches)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        vlm = LlavaForConditionalGeneration(config).to(dtype)
    vlm.save_pretrained(root / "vlm")
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": img}, crop_size={"height": img, "width": img}),
                   tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=template).save_pretrained(root / "vlm")
    n_params = sum(p.numel() for p in vlm.parameters())
    del vlm
    with torch.device(device):
        llm = LlamaForCausalLM(text).to(dtype)
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    del llm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return root / "vlm", root / "llm", n_params


def make_inputs(n: int):
    """`n` decoded images (RGB, 320x240 shapes) and their samples with alt-texts."""
    from PIL import Image, ImageDraw

    from blip3.datagen.inputs import InputSample

    images, samples = [], []
    for i in range(n):
        im = Image.new("RGB", (320, 240), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        ImageDraw.Draw(im).ellipse((40 + i % 50, 30, 200, 190), fill=(240 - i % 200, 30, 90))
        images.append(im)
        samples.append(InputSample(key=f"img_{i:05d}", image=b"", ext="jpg", source_caption=ALT[i % len(ALT)] or None))
    return images, samples


class Clock:
    """CPU seconds of this process (all threads) and wall seconds of a block."""

    def __enter__(self) -> "Clock":
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu0, time.perf_counter() - self.wall0


def bare_loop(vlm_dir: Path, images, batch: int, max_new: int, device: str) -> tuple[Clock, int]:
    """The model's processor and `generate`, nothing else: (clock, tokens generated)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from blip3.datagen.recaption_prompts import DEFAULT_VLM_PROMPT

    proc = AutoProcessor.from_pretrained(vlm_dir, local_files_only=True)
    proc.tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, local_files_only=True, dtype=dtype).to(device).eval()
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                     "text": DEFAULT_VLM_PROMPT}]}], add_generation_prompt=True, tokenize=False)

    def run(chunk):
        enc = proc(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True).to(device)
        enc["pixel_values"] = enc["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        proc.tokenizer.batch_decode(new, skip_special_tokens=True)
        return int((new != proc.tokenizer.pad_token_id).sum())

    run(images[:batch])  # warm-up, as an actor warms up on its first batch
    _sync(device)
    tokens = 0
    with Clock() as clock:
        for i in range(0, len(images), batch):
            tokens += run(images[i:i + batch])
        _sync(device)
    return clock, tokens


def stage(vlm_dir: Path, llm_dir: Path | None, images, samples, batch: int, max_new: int, device: str,
          backend: str = "transformers") -> tuple[Clock, int]:
    """`RecaptionAnnotator.annotate_batch` on the same inputs: (clock, generated tokens of the VLM,
    estimated from the dense captions' token counts)."""
    from blip3.datagen.recaption import make_config
    from blip3.datagen.recaption_models import GenerationSettings

    gen = GenerationSettings(max_new_tokens=max_new, batch_size=batch)
    annotator = make_config(vlm=vlm_dir, llm=llm_dir, use_llm=llm_dir is not None, vlm_generation=gen,
                            llm_generation=gen, backend=backend, device=device)()
    annotator.load()
    annotator.annotate_batch(images[:batch], samples[:batch])  # warm-up
    _sync(device)
    with Clock() as clock:
        out = annotator.annotate_batch(images, samples)
        _sync(device)
    assert len(out) == len(images)
    return clock, len(images) * max_new


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch of the curve (default 16 CPU, 64 GPU)")
    ap.add_argument("--min-batch", type=int, default=1, help="smallest batch of the curve")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("BLIP3_NO_PROGRESS", "1")
    import torch

    gpu = args.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(1)
    max_batch = args.max_batch or (64 if gpu else 16)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        vlm_dir, llm_dir, n_params = build_models(Path(tmp), args.size, args.device)
        build_s = time.perf_counter() - t
        images, samples = make_inputs(args.images)
        b, n, m = args.batch_size, args.images, args.max_new_tokens
        bare, staged = [], []
        for _ in range(args.repeats):  # alternately, so a change of load on a shared machine hits both
            bare.append(bare_loop(vlm_dir, images, b, m, args.device))
            staged.append(stage(vlm_dir, None, images, samples, b, m, args.device, args.backend))
        key = (lambda c: c.wall) if gpu else (lambda c: c.cpu)
        bare_s = statistics.median(key(c) for c, _ in bare)
        stage_s = statistics.median(key(c) for c, _ in staged)
        tokens = bare[0][1]
        unit = "wall" if gpu else "CPU"
        rows = [
            {"run": f"bare generate loop (batch {b})", "images": n, f"{unit} s": bare_s, "images/s": n / bare_s,
             "tokens/s": tokens / bare_s, "vs bare": 1.0},
            {"run": f"VLM stage (batch {b})", "images": n, f"{unit} s": stage_s, "images/s": n / stage_s,
             "tokens/s": tokens / stage_s, "vs bare": bare_s / stage_s},
        ]
        print(rows, flush=True)
        both, _ = stage(vlm_dir, llm_dir, images, samples, b, m, args.device, args.backend)
        merged = sum(1 for s in samples if s.source_caption)
        rows.append({"run": f"VLM + merge LLM stage (batch {b}; {merged} merges)", "images": n, f"{unit} s": key(both),
                     "images/s": n / key(both), "tokens/s": (tokens + merged * m) / key(both), "vs bare": 0.0})
        print(rows[-1], flush=True)
        batch = args.min_batch
        while batch <= max_batch:
            k = min(n, max(8 * batch, 16))  # small batches on fewer images: the rate, not the total, is measured
            clock, _ = stage(vlm_dir, None, images[:k], samples[:k], batch, m, args.device, args.backend)
            rows.append({"run": f"curve: VLM stage, batch {batch}", "images": k, f"{unit} s": key(clock),
                         "images/s": k / key(clock), "tokens/s": k * m / key(clock), "vs bare": 0.0})
            print(rows[-1], flush=True)  # a run cut short still shows what it measured
            batch *= 2
    name = torch.cuda.get_device_name() if gpu else "cpu x1 thread"
    extra = f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else f", peak RSS {peak_rss_mb():.0f} MB"
    title = (f"recaption: {args.size} LLaVA ({n_params / 1e6:.1f}M params), {args.backend}, {name}, "
             f"{m} new tokens{extra}; models built in {build_s:.0f}s")
    path = report(f"bench_recaption_{args.size}_{'gpu' if gpu else 'cpu'}", rows, title)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
