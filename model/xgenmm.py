"""xGen-MM: frozen ViT -> Perceiver Resampler -> image tokens spliced into Phi-3's input embeddings.

Data flow for one batch (shapes in comments):
  pixel_values (N_img, C_max, 3, S, S) + image_sizes (N_img, 2) -> the present crops (sum_crops, 3, S, S)
  -> ViT patch tokens (sum_crops, P, Dv), frozen, no grad -> resampler with per-crop key masks
  -> (sum_crops, L, D) -> flattened in order, written over the `<image placeholder>` positions of
  the token embeddings (row-major over the batch: the k-th image of the batch fills the k-th run).
`input_ids` arrive already expanded (one placeholder id per image token), so logits align
one-to-one with input_ids and labels. `segment_ids` packs several samples in one row:
block-diagonal causal attention (a dense mask, or a FlexAttention block mask: `model.attention`)
and positions restarting at each segment.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .anyres import crop_patch_masks, plan_crops, release_token_groups
from .attention import attention_of, packed_block_mask
from .config import IGNORE_INDEX, ModelConfig
from .loss import dense_token_logps
from .loss import token_logps as chunked_token_logps
from .resampler import PerceiverResampler
from .vision import build_vision_encoder, patch_tokens


@dataclass
class TokenLogps:
    """log p(next label) per position (B, T-1), float32, 0 where unlabelled; and that mask."""

    logps: torch.Tensor
    mask: torch.Tensor


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def read_model_config(file: str | Path) -> ModelConfig:
    """config.json of a model directory -> ModelConfig; anything unreadable or ill-formed (see
    `ModelConfig.from_dict`) is one `UserError` naming the file: a model dir on disk is user input."""
    from blip3.core.errors import UserError

    try:
        return ModelConfig.from_dict(json.loads(Path(file).read_bytes()))
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"not a model config ({type(e).__name__}: {_first_line(e)})", file=file) from None


def read_weights(file: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors: nothing in it can run code); a file that is not
    one (truncated, crafted) is one line naming it, see `weights_errors`."""
    from safetensors.torch import load_file

    with weights_errors(file):
        return load_file(str(file), device=str(device))


@contextlib.contextmanager
def weights_errors(file: str | Path) -> Iterator[None]:
    """A weights file that cannot be read or does not fit the model (other names or shapes) as one
    UserError: a model dir on disk is user input, and torch's mismatch report is a page long."""
    from safetensors import SafetensorError

    from blip3.core.errors import UserError

    try:
        yield
    except UserError:  # already worded (a ValueError too)
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"weights cannot be loaded ({type(e).__name__}: {_first_line(e)})", file=file) from None


def build_lang_model(config: ModelConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised `Phi3ForCausalLM` from `config.lang_model` (Phi3Config kwargs), its
    head biased when `config.lm_head_bias` (the released checkpoint's layout)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**config.lang_model)
    cfg._attn_implementation = attn_implementation
    lm = Phi3ForCausalLM(cfg)
    if config.lm_head_bias:
        lm.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
    return lm


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a packed segment begins (position 0 and each change of id)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def packing_mask(
    segment_ids: torch.Tensor, dtype: torch.dtype, starts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_ids (B, T) -> additive 4D mask (B, 1, T, T) and position ids (B, T).

    A token sees earlier tokens of its own segment only; segment 0 (padding) sees itself only, so
    no row is fully masked. Positions restart at 0 where the segment id changes (`starts`, from
    `segment_starts`, when the caller already has it).
    """
    B, T = segment_ids.shape
    dev = segment_ids.device
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    real = (segment_ids > 0)[:, :, None]
    keep = (same & causal & real) | torch.eye(T, dtype=torch.bool, device=dev)
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=dev).masked_fill(~keep[:, None], torch.finfo(dtype).min)
    return mask, packed_positions(segment_ids, starts)


def packed_positions(segment_ids: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """segment_ids (B, T) -> position ids (B, T) restarting at 0 where each segment begins."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    if starts is None:
        starts = segment_starts(segment_ids)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def train_labels(
    input_ids: torch.Tensor, labels: torch.Tensor, placeholder_id: int, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The labels the loss really uses: -100 on image placeholders, and with packing on padding
    (segment 0) and on the first token of each segment, so no loss crosses an image or a sample
    border. One rule for the forward and for the trainer, which counts labelled tokens on the
    host before the step (its loss is normalised by the labelled tokens of the whole step)."""
    labels = labels.masked_fill(input_ids == placeholder_id, IGNORE_INDEX)
    if segment_ids is not None:
        labels = labels.masked_fill(segment_starts(segment_ids) | (segment_ids == 0), IGNORE_INDEX)
    return labels


def labelled_tokens(labels: torch.Tensor) -> int:
    """Positions a causal-LM loss counts: labels shifted by one (position t predicts t+1), not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class XGenMM(nn.Module):
    """Submodules: `vision_encoder` (open_clip visual, frozen), `vision_tokenizer` (resampler),
    `lang_model` (`Phi3ForCausalLM`). LoRA on the LLM alone:
    `lang_model.*(qkv_proj|o_proj|gate_up_proj|down_proj)` matches nothing else."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        vision_encoder: nn.Module | None = None,
        lang_model: nn.Module | None = None,
    ):
        """Random weights unless built parts are passed in (see `model.weights.build_pretrained`)."""
        super().__init__()
        self.config = config
        self.vision_encoder = vision_encoder if vision_encoder is not None else build_vision_encoder(config)
        self.vision_encoder.requires_grad_(False)
        self.vision_encoder.eval()
        self.vision_tokenizer = PerceiverResampler(
            dim=config.vision_width,
            dim_inner=config.hidden_size,
            depth=config.resampler_depth,
            dim_head=config.resampler_dim_head,
            heads=config.resampler_heads,
            num_latents=config.num_latents,
            ff_mult=config.resampler_ff_mult,
        )
        self.lang_model = lang_model if lang_model is not None else build_lang_model(config)

    # --- modes -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "XGenMM":
        """The ViT stays in eval mode (frozen in every stage)."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.lang_model.lm_head.weight.device

    # --- images ------------------------------------------------------------------------------
    def crop_layout(
        self, image_sizes: torch.Tensor | None, n_images: int, n_crops_max: int
    ) -> tuple[list[int], torch.Tensor | None]:
        """Crops per image and the (sum_crops, P) key masks (in the released resampler-group order).

        Without image_sizes every image uses all `n_crops_max` crops of pixel_values, unmasked
        (one crop when the processor runs without any-res).
        """
        if image_sizes is None:
            return [n_crops_max] * n_images, None
        counts, masks = [], []
        for w, h in image_sizes.tolist():
            plan = plan_crops((w, h), self.config.anyres_grids, self.config.image_size)
            counts.append(plan.n_crops)
            masks.append(crop_patch_masks((w, h), plan, self.config.patch_size))
        return counts, torch.cat(masks)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """(N_img, C_max, 3, S, S) -> (sum_crops * num_latents, hidden) image tokens, in order."""
        if pixel_values.dim() == 4:  # (N_img, 3, S, S): one crop per image
            pixel_values = pixel_values[:, None]
        counts, mask = self.crop_layout(image_sizes, pixel_values.shape[0], pixel_values.shape[1])
        if max(counts) > pixel_values.shape[1]:
            raise ValueError(f"image_sizes need {max(counts)} crops but pixel_values has {pixel_values.shape[1]}")
        crops = torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)])  # (sum_crops, 3, S, S)
        vit_dtype = next(self.vision_encoder.parameters()).dtype
        with torch.no_grad():
            feats = patch_tokens(self.vision_encoder, crops.to(self.device, vit_dtype))  # (sum_crops, P, Dv)
        if image_sizes is not None:
            feats = self._release_groups(feats, image_sizes, counts)
        if mask is not None:
            mask = mask.to(feats.device)
            if bool(mask.all()):
                mask = None
        dtype = self.vision_tokenizer.projection.weight.dtype
        tokens = self.vision_tokenizer(feats.to(dtype), mask)  # (sum_crops, L, D)
        return tokens.flatten(0, 1)

    def _release_groups(self, feats: torch.Tensor, image_sizes: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Regroup each image's grid-crop tokens as the released model feeds its resampler
        (`anyres.release_token_groups`); the base crop stays as it is."""
        out, start = [], 0
        for (w, h), n in zip(image_sizes.tolist(), counts):
            plan = plan_crops((w, h), self.config.anyres_grids, self.config.image_size)
            out += [feats[start : start + 1], release_token_groups(feats[start + 1 : start + n], plan.rows, plan.cols)]
            start += n
        return torch.cat(out)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, D) with each placeholder position replaced by its image token.

        slots: the (B, T) placeholder mask of input_ids, when the caller already computed it."""
        embeds = self.lang_model.get_input_embeddings()(input_ids)
        if slots is None:
            slots = input_ids == self.config.image_placeholder_id  # (B, T)
        n_slots = int(slots.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but no pixel_values were given")
            return embeds
        images = self.encode_images(pixel_values, image_sizes)
        if images.shape[0] != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} image placeholder tokens but the images give {images.shape[0]} "
                "(a sample cut inside an image, or image_sizes that do not match the processor's)"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), images.to(embeds.dtype))

    # --- forward / generate ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_logps: str | None = None,
        **lm_kwargs,
    ):
        """Returns transformers' `CausalLMOutputWithPast` (.loss when labels are given, .logits (B, T, V)).

        token_logps: "chunked" or "dense" (with labels): return a `TokenLogps` instead, the log
        p of each next label, which every training objective is built from (`model.loss`);
        "chunked" never holds the full fp32 logits.

        labels: -100 is ignored; placeholder positions, padding (segment 0) and the first token
        of each packed segment are forced to -100 so no loss crosses an image or a sample boundary.
        image_sizes: (N_img, 2) original (width, height) -> any-res crops; None = all crops, unmasked.
        """
        slots = input_ids == self.config.image_placeholder_id
        embeds = self.embed(input_ids, pixel_values, image_sizes, slots=slots)
        if segment_ids is not None:
            if attention_mask is not None:
                segment_ids = segment_ids * attention_mask.to(segment_ids.dtype)
            attention_mask, position_ids = self._packed_attention(segment_ids, embeds.dtype)
        if labels is not None:
            labels = train_labels(input_ids, labels, self.config.image_placeholder_id, segment_ids)
        if token_logps is not None:
            if labels is None:
                raise ValueError("token_logps needs labels")
            return self._token_logps(embeds, attention_mask, position_ids, labels, token_logps, lm_kwargs)
        return self.lang_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **lm_kwargs
        )

    def _packed_attention(self, segment_ids: torch.Tensor, dtype: torch.dtype):
        """The attention mask and position ids of packed rows, in the form the LM's attention
        implementation takes: a dense additive mask, or a FlexAttention `BlockMask`."""
        starts = segment_starts(segment_ids)
        if attention_of(self.lang_model) == "flex":
            return packed_block_mask(segment_ids), packed_positions(segment_ids, starts)
        return packing_mask(segment_ids, dtype, starts)

    def _token_logps(self, embeds, attention_mask, position_ids, labels, impl: str, lm_kwargs) -> "TokenLogps":
        # inside forward, so FSDP2's hooks have the LM head's weight gathered here
        if impl == "dense":
            logits = self.lang_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     **lm_kwargs).logits
            return TokenLogps(*dense_token_logps(logits, labels))
        if impl != "chunked":
            raise ValueError(f"token_logps is chunked or dense, got {impl!r}")
        hidden = self.lang_model.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       **lm_kwargs).last_hidden_state
        head = self.lang_model.lm_head
        return TokenLogps(*chunked_token_logps(hidden, head.weight, labels, bias=head.bias))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """New token ids only (B, T_new); generate_kwargs go to `Phi3ForCausalLM.generate`."""
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.lang_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # --- save / load -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors (every weight, the frozen ViT included)."""
        from safetensors.torch import save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_model(self, str(d / WEIGHTS_FILE))

    @classmethod
    def empty_from_pretrained(cls, directory: str | Path) -> tuple["XGenMM", Path]:
        """The model of a `save_pretrained` directory built on the meta device (shapes, no memory,
        no random init) and its weights file: `from_pretrained` loads it at once,
        `model.weights.materialize` after FSDP2 has sharded the model."""
        from huggingface_hub.errors import StrictDataclassError

        from blip3.core.errors import MissingWeightsError, UserError

        d = Path(directory)
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise MissingWeightsError(f"no {CONFIG_FILE} + {WEIGHTS_FILE} in {d}", field="model dir")
        config = read_model_config(d / CONFIG_FILE)
        try:
            with torch.device("meta"):  # a Phi3Config kwarg we do not check (transformers validates it)
                model = cls(config)
        except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
            raise UserError(f"not a model config ({type(e).__name__}: {_first_line(e)})", file=d / CONFIG_FILE) from None
        return model, d / WEIGHTS_FILE

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> "XGenMM":
        """Load a directory written by `save_pretrained` (no random init of the big weights)."""
        model, weights = cls.empty_from_pretrained(directory)
        with weights_errors(weights):
            model.load_state_dict(read_weights(weights, device), strict=True, assign=True)
        model.reset_rotary(device)
        model.vision_encoder.requires_grad_(False)
        return model

    def reset_rotary(self, device: str | torch.device) -> None:
        """Rebuild the rotary tables on `device`: they are non-persistent buffers (not in the
        weights file), so a model built on the meta device has none until this runs."""
        rotary = self.lang_model.model.rotary_emb
        with torch.device(device):
            self.lang_model.model.rotary_emb = type(rotary)(config=self.lang_model.config)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
