"""Real weights from local files only: SigLIP (open_clip checkpoint), Phi-3 (a model directory),
and the released xGen-MM checkpoint's state dict. Each is looked up as: explicit path, then its
environment variable, then the Hugging Face cache (local_files_only). Nothing is downloaded; a
missing piece raises one `MissingWeightsError` that names the flag and the variable to set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from blip3.core.errors import MissingWeightsError

from .config import ModelConfig

SIGLIP_ENV, PHI3_ENV, XGENMM_ENV = "BLIP3_SIGLIP_CKPT", "BLIP3_PHI3_DIR", "BLIP3_XGENMM_CKPT"
SIGLIP_REPO, SIGLIP_FILES = "timm/ViT-SO400M-14-SigLIP-384", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PHI3_REPO = "microsoft/Phi-3-mini-4k-instruct"
XGENMM_REPO = "Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5"
RELEASED_PREFIX = "vlm."  # the released checkpoint nests the model under `vlm`


def _cached_file(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    return hit if isinstance(hit, str) else None


def _cached_snapshot(repo: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
        return None


def resolve_siglip(path: str | None = None) -> str:
    """Path of the open_clip SigLIP so400m checkpoint file."""
    cand = path or os.environ.get(SIGLIP_ENV)
    if cand:
        if not Path(cand).is_file():
            raise MissingWeightsError(f"SigLIP checkpoint {cand} is not a file", field=f"--siglip-ckpt / ${SIGLIP_ENV}")
        return cand
    for name in SIGLIP_FILES:
        if hit := _cached_file(SIGLIP_REPO, name):
            return hit
    raise MissingWeightsError(
        f"SigLIP weights not found: pass --siglip-ckpt or set ${SIGLIP_ENV} to an open_clip checkpoint "
        f"(or have {SIGLIP_REPO} in the Hugging Face cache)"
    )


def resolve_phi3_dir(path: str | None = None) -> str:
    """A directory with Phi-3's config.json, weights and tokenizer."""
    cand = path or os.environ.get(PHI3_ENV)
    if cand:
        if not (Path(cand) / "config.json").is_file():
            raise MissingWeightsError(f"{cand} holds no config.json", field=f"--phi3-dir / ${PHI3_ENV}")
        return cand
    if hit := _cached_snapshot(PHI3_REPO):
        return hit
    raise MissingWeightsError(
        f"Phi-3 not found: pass --phi3-dir or set ${PHI3_ENV} to a Phi-3-mini-4k-instruct directory "
        f"(or have {PHI3_REPO} in the Hugging Face cache)"
    )


def resolve_xgenmm(path: str | None = None) -> list[Path]:
    """The released checkpoint's safetensors file(s) (a file or a directory of shards)."""
    cand = path or os.environ.get(XGENMM_ENV) or _cached_snapshot(XGENMM_REPO)
    if cand:
        p = Path(cand)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else ([p] if p.is_file() else [])
        if files:
            return files
    raise MissingWeightsError(
        f"xGen-MM checkpoint not found: pass --xgenmm-ckpt or set ${XGENMM_ENV} to its safetensors file or "
        f"directory (or have {XGENMM_REPO} in the Hugging Face cache)"
    )


def load_phi3_tokenizer(phi3_dir: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_phi3_dir(phi3_dir), local_files_only=True)


def siglip_hf_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' SiglipVisionTransformer names -> timm's VisionTransformer (open_clip's trunk).

    q/k/v projections are concatenated into timm's fused qkv; the MAP head becomes `attn_pool`
    (its packed in_proj splits into q and kv). Note: timm's so400m uses exact GELU where
    transformers' Siglip uses the tanh approximation; the same weights differ by ~1e-4 per token.
    """
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat([state[f"{src}self_attn.{x}_proj.{part}"] for x in "qkv"])
            out[f"{dst}attn.proj.{part}"] = state[f"{src}self_attn.out_proj.{part}"]
            out[f"{dst}norm1.{part}"] = state[f"{src}layer_norm1.{part}"]
            out[f"{dst}norm2.{part}"] = state[f"{src}layer_norm2.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = state[f"{src}mlp.fc1.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = state[f"{src}mlp.fc2.{part}"]
    pos = state["embeddings.position_embedding.weight"]
    out["pos_embed"] = pos[None]  # (1, P, D)
    for part in ("weight", "bias"):
        out[f"patch_embed.proj.{part}"] = state[f"embeddings.patch_embedding.{part}"]
        out[f"norm.{part}"] = state[f"post_layernorm.{part}"]
    if "head.probe" in state:
        D = pos.shape[1]
        out["attn_pool.latent"] = state["head.probe"]
        w, b = state["head.attention.in_proj_weight"], state["head.attention.in_proj_bias"]
        out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = w[:D], w[D:]
        out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = b[:D], b[D:]
        for part in ("weight", "bias"):
            out[f"attn_pool.proj.{part}"] = state[f"head.attention.out_proj.{part}"]
            out[f"attn_pool.norm.{part}"] = state[f"head.layernorm.{part}"]
            out[f"attn_pool.mlp.fc1.{part}"] = state[f"head.mlp.fc1.{part}"]
            out[f"attn_pool.mlp.fc2.{part}"] = state[f"head.mlp.fc2.{part}"]
    return out


def load_released_state_dict(model, path: str | None = None) -> dict[str, list[str]]:
    """Copy the released checkpoint into `model`: the resampler strictly, the SigLIP tower
    strictly when ours is timm-backed (names mapped from transformers' Siglip), the LLM where
    names and shapes match. Returns {"loaded": [...], "skipped": [...]} (checkpoint names,
    prefix removed)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in resolve_xgenmm(path):
        state.update(load_file(str(f)))
    state = {k.removeprefix(RELEASED_PREFIX): v for k, v in state.items()}
    resampler = {k.removeprefix("vision_tokenizer."): v for k, v in state.items() if k.startswith("vision_tokenizer.")}
    model.vision_tokenizer.load_state_dict(resampler, strict=True)
    loaded = [f"vision_tokenizer.{k}" for k in resampler]
    vision = {k.removeprefix("vision_encoder."): v for k, v in state.items() if k.startswith("vision_encoder.")}
    trunk = getattr(model.vision_encoder, "trunk", None)
    if vision and trunk is not None:
        trunk.load_state_dict(siglip_hf_to_timm(vision), strict=True)
        loaded += [f"vision_encoder.{k}" for k in vision]
    own = model.lang_model.state_dict()
    lm = {}
    skipped = []
    for k, v in state.items():
        if not k.startswith("lang_model."):
            if not k.startswith("vision_tokenizer.") and not (k.startswith("vision_encoder.") and trunk is not None):
                skipped.append(k)
            continue
        name = k.removeprefix("lang_model.")
        if name in own and own[name].shape == v.shape:
            lm[name] = v
            loaded.append(k)
        else:
            skipped.append(k)
    model.lang_model.load_state_dict(lm, strict=False)
    return {"loaded": loaded, "skipped": skipped}


def build_pretrained(
    config: ModelConfig,
    *,
    siglip_ckpt: str | None = None,
    phi3_dir: str | None = None,
    xgenmm_ckpt: str | None = None,
    use_released: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """XGenMM with SigLIP + Phi-3 weights; with use_released, the released checkpoint on top
    (resampler, LLM, and the SigLIP tower, which then needs no separate checkpoint)."""
    from transformers import Phi3ForCausalLM

    from .vision import build_vision_encoder
    from .xgenmm import XGenMM

    siglip = _optional(resolve_siglip, siglip_ckpt) if use_released else resolve_siglip(siglip_ckpt)
    vision = build_vision_encoder(config, siglip)
    lm = Phi3ForCausalLM.from_pretrained(
        resolve_phi3_dir(phi3_dir), local_files_only=True, dtype=dtype, attn_implementation="sdpa"
    )
    if lm.config.hidden_size != config.hidden_size:
        raise MissingWeightsError(f"Phi-3 hidden size {lm.config.hidden_size} != config {config.hidden_size}", field="--phi3-dir")
    model = XGenMM(config, vision_encoder=vision, lang_model=lm).to(dtype)
    if use_released:
        report = load_released_state_dict(model, xgenmm_ckpt)
        if siglip is None and not any(k.startswith("vision_encoder.") for k in report["loaded"]):
            resolve_siglip(siglip_ckpt)  # the released file had no usable tower: raise the SigLIP error
    return model


def _optional(resolve, path):
    """The resolved path, or None when missing (the released checkpoint may carry the tower)."""
    try:
        return resolve(path)
    except MissingWeightsError:
        return None
