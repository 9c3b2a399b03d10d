"""Real weights from local files only: SigLIP (open_clip checkpoint), Phi-3 (a model directory),
and the released xGen-MM checkpoint's state dict. Each is looked up as: explicit path, then its
environment variable, then the Hugging Face cache (local_files_only). Nothing is downloaded; a
missing piece raises one `MissingWeightsError` that names the flag and the variable to set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from blip3.core.errors import MissingWeightsError

from .config import ModelConfig
from .vision import use_tanh_gelu

SIGLIP_ENV, PHI3_ENV, XGENMM_ENV = "BLIP3_SIGLIP_CKPT", "BLIP3_PHI3_DIR", "BLIP3_XGENMM_CKPT"
SIGLIP_REPO, SIGLIP_FILES = "timm/ViT-SO400M-14-SigLIP-384", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PHI3_REPO = "microsoft/Phi-3-mini-4k-instruct"
XGENMM_REPO = "Salesforce/xgen-mm-phi3-mini-instruct-r-v1.5"
RELEASED_PREFIX = "vlm."  # the released checkpoint nests the model under `vlm`
RELEASE_CONFIG = "config.json"  # the release's own config, next to its safetensors


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


def _siglip_plan(layers: list[int], head: bool) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """timm name -> (transformers' Siglip names it is made of, how they combine).

    q/k/v projections are concatenated into timm's fused qkv; the MAP head becomes `attn_pool` (its
    packed in_proj splits into q (first third) and kv)."""
    same = lambda t: t  # noqa: E731
    plan: dict[str, tuple[tuple[str, ...], Callable]] = {}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            plan[f"{dst}attn.qkv.{part}"] = (tuple(f"{src}self_attn.{x}_proj.{part}" for x in "qkv"),
                                             lambda *t: torch.cat(t))
            for mine, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                plan[f"{dst}{mine}.{part}"] = ((f"{src}{theirs}.{part}",), same)
    plan["pos_embed"] = (("embeddings.position_embedding.weight",), lambda t: t[None])  # (1, P, D)
    for part in ("weight", "bias"):
        plan[f"patch_embed.proj.{part}"] = ((f"embeddings.patch_embedding.{part}",), same)
        plan[f"norm.{part}"] = ((f"post_layernorm.{part}",), same)
    if head:
        plan["attn_pool.latent"] = (("head.probe",), same)
        for part, key in (("weight", "head.attention.in_proj_weight"), ("bias", "head.attention.in_proj_bias")):
            plan[f"attn_pool.q.{part}"] = ((key,), lambda t: t[: t.shape[0] // 3])
            plan[f"attn_pool.kv.{part}"] = ((key,), lambda t: t[t.shape[0] // 3 :])
        for part in ("weight", "bias"):
            for mine, theirs in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                                 ("mlp.fc2", "mlp.fc2")):
                plan[f"attn_pool.{mine}.{part}"] = ((f"head.{theirs}.{part}",), same)
    return plan


def siglip_hf_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' SiglipVisionTransformer names -> timm's VisionTransformer (open_clip's trunk),
    for a complete Siglip state dict (its layers and head read from its own keys)."""
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    plan = _siglip_plan(layers, head="head.probe" in state)
    return {dst: combine(*(state[k] for k in srcs)) for dst, (srcs, combine) in plan.items()}


def _load_siglip(trunk, vision: dict[str, torch.Tensor], file: Path) -> None:
    """Load the release's Siglip tower (names without `vision_encoder.`) into open_clip's timm
    trunk, every key accounted for: a key our tower needs and the file lacks, one it holds that we
    cannot place, or one of the wrong shape is one `ReleasedLayoutError` naming the checkpoint key
    and the file (not a KeyError, nor torch's page-long mismatch report)."""
    own = trunk.state_dict()
    layers = sorted({int(k.split(".")[1]) for k in own if k.startswith("blocks.")})
    plan = _siglip_plan(layers, head=any(k.startswith("attn_pool.") for k in own))
    needed = {k for srcs, _ in plan.values() for k in srcs}
    problems = {
        "missing": sorted(needed - set(vision)),
        "unexpected": sorted(set(vision) - needed),
        "not in the release's layout": sorted(set(own) - set(plan)),  # a trunk that is not a SigLIP ViT
    }
    mapped = {dst: combine(*(vision[k] for k in srcs)) for dst, (srcs, combine) in plan.items()
              if dst in own and set(srcs) <= set(vision)}
    problems["wrong shape"] = sorted({k for dst, t in mapped.items() if t.shape != own[dst].shape for k in plan[dst][0]})
    detail = "; ".join(f"{what}: {['vision_encoder.' + k for k in keys[:5]]}{' ...' if len(keys) > 5 else ''}"
                       for what, keys in problems.items() if keys)
    if detail:
        raise ReleasedLayoutError(f"released vision tower does not match the model ({detail})", file=file)
    trunk.load_state_dict(mapped, strict=True)
    use_tanh_gelu(trunk)  # transformers' Siglip, which the release was trained in, uses the tanh GELU


# The authors wrap Phi-3's input embedding and output head in "decoupled" layers: the rows of the
# tokens they added live in a separate table, and their logits come from a separate linear layer
# appended after the base vocabulary; the base head carries a bias. Both are exactly one larger
# embedding table and one biased head, which is how we hold them (one module each, so LoRA,
# FSDP and saving see plain Phi-3 parts).
ADDITIONAL_EMBEDDING = "lang_model.model.embed_tokens.additional_embedding.weight"
HEAD = "lang_model.lm_head."
ADDITIONAL_FC = "lang_model.lm_head.additional_fc."


class ReleasedLayoutError(MissingWeightsError):
    """The released checkpoint does not fill our model key for key (renamed, missing or extra)."""


def released_initial_tokenizer_len(files: list[Path]) -> int | None:
    """`text_config.initial_tokenizer_len` of the release's config.json, next to its weights (None
    when there is no config.json there): the tokenizer length before the three added tokens, i.e.
    the first id the decoupled layers send to their additional rows (32012 in the release, whose
    Phi-3 table has 32064 rows)."""
    import json

    cfg = files[0].parent / RELEASE_CONFIG
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_bytes())["text_config"]["initial_tokenizer_len"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON / no such field / not an object
        raise ReleasedLayoutError(f"no text_config.initial_tokenizer_len ({type(e).__name__}: {e})"[:200],
                                  file=cfg) from None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ReleasedLayoutError(f"text_config.initial_tokenizer_len must be a positive integer, not {value!r}"[:200],
                                  file=cfg)
    return value


def merge_decoupled(state: dict[str, torch.Tensor], initial_tokenizer_len: int | None) -> dict[str, torch.Tensor]:
    """Released-layout state dict (prefix `vlm.` removed) -> the same weights as one embedding
    table and one biased head, following the authors' decoupled layers (LAVIS xgen-mm,
    `DecoupledEmbedding` / `DecoupledLinear`): ids above `T - 1` (T = `initial_tokenizer_len`)
    read the additional rows, and only the first T base logits are kept before the additional
    ones. So the merged table is `emb[:T] ++ additional` and the head `head[:T] ++ additional_fc`;
    base rows T.. (Phi-3's unused padding rows 32012-32063 in the release) are never read by the
    authors' forward and are dropped."""
    out = dict(state)
    extra = out.pop(ADDITIONAL_EMBEDDING, None)
    fc_w, fc_b = out.pop(ADDITIONAL_FC + "weight", None), out.pop(ADDITIONAL_FC + "bias", None)
    if (extra is None) != (fc_w is None) or (fc_w is None) != (fc_b is None):
        raise ReleasedLayoutError(
            "the decoupled embedding and head come together: found "
            f"{[k for k, v in ((ADDITIONAL_EMBEDDING, extra), (ADDITIONAL_FC + 'weight', fc_w), (ADDITIONAL_FC + 'bias', fc_b)) if v is not None]}",
            field="--xgenmm-ckpt",
        )
    if extra is None:
        return out
    if initial_tokenizer_len is None:
        raise ReleasedLayoutError(
            f"the decoupled layers need the release's {RELEASE_CONFIG} (text_config.initial_tokenizer_len) "
            "next to its weights", field="--xgenmm-ckpt")
    emb, head_w, head_b = "lang_model.model.embed_tokens.weight", HEAD + "weight", HEAD + "bias"
    missing = [k for k in (emb, head_w, head_b) if k not in out]
    if missing:
        raise ReleasedLayoutError(f"decoupled layers without their base weights: missing {missing}", field="--xgenmm-ckpt")
    if extra.shape[0] != fc_w.shape[0] or not out[emb].shape[0] == out[head_w].shape[0] == out[head_b].shape[0]:
        raise ReleasedLayoutError(
            f"decoupled vocabularies disagree: embedding {tuple(out[emb].shape)} + {tuple(extra.shape)}, "
            f"head {tuple(out[head_w].shape)} + {tuple(fc_w.shape)}",
            field="--xgenmm-ckpt",
        )
    T = initial_tokenizer_len
    if T > out[emb].shape[0]:
        raise ReleasedLayoutError(
            f"initial_tokenizer_len {T} exceeds the base embedding's {out[emb].shape[0]} rows", field="--xgenmm-ckpt")
    out[emb] = torch.cat([out[emb][:T], extra])
    out[head_w] = torch.cat([out[head_w][:T], fc_w])
    out[head_b] = torch.cat([out[head_b][:T], fc_b])
    return out


def check_released_tokens(tokenizer, initial_tokenizer_len: int) -> None:
    """Our tokenizer must give each added token the id the release trained it under (its row in
    the merged table): one `ReleasedLayoutError` naming the first token that differs."""
    from .tokenizer import released_token_ids

    for token, want in released_token_ids(initial_tokenizer_len).items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise ReleasedLayoutError(f"the tokenizer maps {token!r} to {got}, the release to {want}", field="--phi3-dir")


def fit_lang_model(model, vocab_size: int, head_bias: bool) -> None:
    """Resize `model`'s LLM embedding and head to `vocab_size` rows (head with a bias or not) and
    record it in `model.config`, so `save_pretrained` / `from_pretrained` rebuild the same shapes.
    Only shapes are set here (the new modules start uninitialised-random); the caller loads the
    weights."""
    from torch import nn

    lm = model.lang_model
    old = lm.get_input_embeddings()
    head = lm.lm_head
    if old.num_embeddings != vocab_size:
        lm.set_input_embeddings(nn.Embedding(vocab_size, old.embedding_dim, padding_idx=old.padding_idx,
                                             dtype=old.weight.dtype, device=old.weight.device))
    if head.out_features != vocab_size or (head.bias is not None) != head_bias:
        w = head.weight
        lm.lm_head = nn.Linear(head.in_features, vocab_size, bias=head_bias, dtype=w.dtype, device=w.device)
    lm.config.vocab_size = vocab_size
    model.config.lang_model["vocab_size"] = vocab_size
    model.config.lm_head_bias = head_bias


def load_released_state_dict(model, path: str | None = None) -> dict[str, list[str]]:
    """Copy the released checkpoint into `model`, every key accounted for.

    The resampler and the LLM load strictly (the decoupled embedding/head merged first, cut at the
    `initial_tokenizer_len` of the release's config.json, see `merge_decoupled`; the model's LLM
    is resized to match); any key of theirs we cannot place, or any of ours the file lacks, raises
    `ReleasedLayoutError`. The SigLIP tower loads strictly, with the tanh GELU it was trained with,
    when ours is timm-backed (names mapped from transformers' Siglip); otherwise its keys are the
    only ones reported as skipped. Returns {"loaded": [...], "skipped": [...]} (checkpoint names,
    prefix removed)."""
    from safetensors.torch import load_file

    files = resolve_xgenmm(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k.removeprefix(RELEASED_PREFIX): v for k, v in state.items()}
    decoupled = ADDITIONAL_EMBEDDING in state or ADDITIONAL_FC + "weight" in state
    state = merge_decoupled(state, released_initial_tokenizer_len(files) if decoupled else None)
    parts = ("vision_tokenizer.", "vision_encoder.", "lang_model.")
    stray = [k for k in state if not k.startswith(parts)]
    if stray:
        raise ReleasedLayoutError(f"keys outside {list(parts)}: {stray[:5]}", field="--xgenmm-ckpt")
    resampler = {k.removeprefix("vision_tokenizer."): v for k, v in state.items() if k.startswith("vision_tokenizer.")}
    where = files[0] if len(files) == 1 else files[0].parent
    _load_strict(model.vision_tokenizer, resampler, "vision_tokenizer.", where)
    loaded = [f"vision_tokenizer.{k}" for k in resampler]
    lm = {k.removeprefix("lang_model."): v for k, v in state.items() if k.startswith("lang_model.")}
    if "model.embed_tokens.weight" in lm:
        fit_lang_model(model, lm["model.embed_tokens.weight"].shape[0], head_bias="lm_head.bias" in lm)
    _load_strict(model.lang_model, lm, "lang_model.", where)
    loaded += [f"lang_model.{k}" for k in lm]
    vision = {k.removeprefix("vision_encoder."): v for k, v in state.items() if k.startswith("vision_encoder.")}
    trunk = getattr(model.vision_encoder, "trunk", None)
    skipped = []
    if vision and trunk is not None:
        _load_siglip(trunk, vision, where)
        loaded += [f"vision_encoder.{k}" for k in vision]
    else:
        skipped = [f"vision_encoder.{k}" for k in vision]
    return {"loaded": loaded, "skipped": skipped}


def _load_strict(module, state: dict[str, torch.Tensor], prefix: str, file: Path) -> None:
    """load_state_dict(strict=True), with names and shapes checked first so the error is one line
    naming the keys (torch's own message lists every mismatch across several lines)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {[prefix + k for k in keys[:5]]}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise ReleasedLayoutError(f"released checkpoint does not match the model ({detail})", file=file)
    module.load_state_dict(state, strict=True)


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


def materialize(model, weights_file: str | Path, device: torch.device, *, from_rank0: bool = False) -> None:
    """A model built on the meta device (`XGenMM.empty_from_pretrained`), possibly wrapped for
    activation checkpointing / compile and sharded by FSDP2 -> real tensors on `device` holding the
    file's weights, each rank allocating only its own shards (the full model never exists on a
    rank). from_rank0: rank 0 alone reads the file and broadcasts it, one host copy instead of one
    per rank. The rotary tables (not in the file) are rebuilt."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from blip3.model.xgenmm import read_weights, weights_errors

    model.to_empty(device=device)
    read = not from_rank0 or dist.get_rank() == 0
    state = read_weights(weights_file) if read else {}
    # full_state_dict: the file holds whole tensors; each rank copies its slice into its shards
    # (names are matched through the checkpoint / compile wrappers)
    with weights_errors(weights_file):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                    broadcast_from_rank0=from_rank0, strict=True))
    model.reset_rotary(device)
