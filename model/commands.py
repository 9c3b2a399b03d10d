"""CLI of `model`: `blip3 model info | init | generate`.

`init` writes a model directory (config.json, model.safetensors, tokenizer, processor config)
that the trainer's first stage starts from: random weights for `tiny`, or SigLIP + Phi-3 (+ the
released checkpoint) from local files for `phi3-mini`. torch is imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from blip3.core.options import out_option, output_path

model_app = typer.Typer(help="The xGen-MM model: sizes, model directories, a quick generate.", no_args_is_help=True)


@model_app.command("info")
def info(config: Literal["tiny", "phi3-mini"] = typer.Option("tiny", "--config", help="Model configuration.")) -> None:
    """Parameter counts per part (built on the meta device: no memory, no weights)."""
    import pyarrow as pa
    import torch

    from blip3.core.tables import write_result
    from blip3.model.config import get_config
    from blip3.model.xgenmm import XGenMM

    cfg = get_config(config)
    with torch.device("meta"):
        m = XGenMM(cfg)
    rows = [
        {"part": name, "params": sum(p.numel() for p in mod.parameters()), "trained": "no (frozen)" if name == "vision_encoder" else "yes"}
        for name, mod in (("vision_encoder", m.vision_encoder), ("vision_tokenizer", m.vision_tokenizer), ("lang_model", m.lang_model))
    ]
    rows.append({"part": "total", "params": m.num_params(), "trained": f"{m.num_params(True):,}"})
    write_result(pa.Table.from_pylist(rows), title=f"{cfg.name}: {cfg.num_latents} tokens per crop, up to {cfg.max_crops} crops per image")


@model_app.command("init")
def init(
    output: Optional[Path] = typer.Argument(None, help="Model directory to write (the older form of -o/--out)."),
    out: Optional[Path] = out_option("model directory to write"),
    config: Literal["tiny", "phi3-mini"] = typer.Option("tiny", "--config", help="Model configuration."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    pretrained: bool = typer.Option(False, "--pretrained", help="phi3-mini: load SigLIP and Phi-3 from local files."),
    released: bool = typer.Option(False, "--released", help="Also load the released xGen-MM resampler/LLM weights."),
    siglip_ckpt: Optional[str] = typer.Option(None, "--siglip-ckpt", help="open_clip SigLIP checkpoint ($BLIP3_SIGLIP_CKPT)."),
    phi3_dir: Optional[str] = typer.Option(None, "--phi3-dir", help="Phi-3-mini directory ($BLIP3_PHI3_DIR)."),
    xgenmm_ckpt: Optional[str] = typer.Option(None, "--xgenmm-ckpt", help="Released checkpoint ($BLIP3_XGENMM_CKPT)."),
    no_anyres: bool = typer.Option(False, "--no-anyres", help="One squashed crop per image (pretraining style)."),
) -> None:
    """Write a model directory (weights + tokenizer + processor) for training or generate."""
    import torch

    from blip3.core.logs import console
    from blip3.model.config import get_config
    from blip3.model.processor import XGenMMProcessor
    from blip3.model.xgenmm import XGenMM

    out = output_path(output, out, "model directory")
    cfg = get_config(config)
    torch.manual_seed(seed)
    if pretrained or released:
        from blip3.model.weights import build_pretrained

        model = build_pretrained(cfg, siglip_ckpt=siglip_ckpt, phi3_dir=phi3_dir, xgenmm_ckpt=xgenmm_ckpt, use_released=released)
    else:
        model = XGenMM(cfg)
    proc = XGenMMProcessor.from_config(cfg, phi3_dir=phi3_dir, anyres=not no_anyres)
    if released:
        from blip3.model.weights import check_released_tokens, released_initial_tokenizer_len, resolve_xgenmm

        if (T := released_initial_tokenizer_len(resolve_xgenmm(xgenmm_ckpt))) is not None:
            check_released_tokens(proc.tokenizer, T)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    console.print(f"[green]{out}[/]: {cfg.name}, {model.num_params():,} parameters ({model.num_params(True):,} trained)")


@model_app.command("generate")
def generate(
    model_dir: Path = typer.Argument(..., help="A model directory (blip3 model init, or a training stage's output)."),
    prompt: str = typer.Option(..., "--prompt", help="User text; put <image> where each image stands."),
    image: List[Path] = typer.Option([], "--image", help="Image file(s), in order of the <image> markers."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the Phi-3 chat template."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
) -> None:
    """Greedy generation with images, for a quick look at a model."""
    from PIL import Image

    from blip3.core.errors import UserError
    from blip3.model.processor import XGenMMProcessor
    from blip3.model.xgenmm import XGenMM

    images = []
    for p in image:
        if not p.is_file():
            raise UserError("no such image", field="--image", file=p)
        try:
            images.append(Image.open(p).convert("RGB"))
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"not a readable image ({type(e).__name__})", field="--image", file=p) from None
    model = XGenMM.from_pretrained(model_dir, device=device).eval()
    proc = XGenMMProcessor.from_pretrained(model_dir, model.config)
    try:
        if chat:
            enc = proc.encode_chat([{"role": "user", "content": prompt}], images, add_generation_prompt=True)
        else:
            enc = proc.encode_prompt(prompt, images)
    except ValueError as e:
        raise UserError(str(e), field="--prompt") from e
    batch = {k: v.to(device) for k, v in proc.collate([enc]).items()}
    eos = [proc.tokenizer.eos_token_id, proc.end_id]
    new = model.generate(
        batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("image_sizes"),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=proc.pad_id,
    )
    typer.echo(proc.decode(new[0]))


def register(app: typer.Typer) -> None:
    """Add `blip3 model ...` to the app."""
    app.add_typer(model_app, name="model")
