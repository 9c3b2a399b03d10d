"""XGenMMProcessor: text + images -> input_ids / labels / pixel_values the model reads.

Each `<image>` in the text becomes that image's run of `<image placeholder>` ids (n_crops x
num_latents of them), so the sequence the model sees has one id per embedding and logits align
with input_ids and labels one-to-one. Labels are -100 on placeholders, on BOS, and (chats) on
everything but assistant turns. Three sample shapes, as the data formats define them:
- caption:     `<s><image>{caption}<|endofchunk|><|endoftext|>`
- interleaved: texts and images in document order, `<|endofchunk|>` closing each text that
               follows an image, then `<|endoftext|>`
- chat:        Phi-3 template, `<|system|>\n..<|end|>\n<|user|>\n..<|end|>\n<|assistant|>\n..<|end|>\n`
Each sample is tokenized as one string (what the chat template renders), so the ids match the
tokenizer's own reading of the whole text; labels come from character spans via offsets. The text
budget (`max_text_tokens`) counts text tokens only, before images are spliced in; a sample is
never cut inside an image (images after the cut are dropped with it). Text from data never becomes
a control token (`model.control_tokens`): the spellings of the tokenizer's special tokens inside
captions, document texts and chat contents are escaped before tokenizing, except `<image>` in chat
contents, which places the images. `encode_prompt` takes text built by code (eval's few-shot
templates) and reads it as written. A sample that still cannot be encoded (more `<image>` markers
than images) raises `UnencodableSample`, which the trainer counts as a skipped sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .anyres import anyres_crops
from .config import END_OF_CHUNK_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, PLACEHOLDER_TOKEN, ModelConfig
from .control_tokens import control_pattern, escape_control_tokens

PROCESSOR_FILE = "processor_config.json"
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class UnencodableSample(ValueError):
    """This sample's text and images do not fit together (its `<image>` markers and its images
    differ in number): the sample is skipped, not the run stopped."""


@dataclass
class Encoded:
    """One sample: ids/labels of equal length, and its images in order of appearance."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)  # each (n_crops, 3, S, S)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class RowPacker:
    """Greedy in-order packing into rows of `seq_len` tokens: a sample joins the current row if it
    fits, else opens the next one. The one rule behind `XGenMMProcessor.pack` and the trainer's
    packed micro-batches (`train.data.BatchStream`, which stops at `max_rows`)."""

    def __init__(self, seq_len: int, max_rows: int | None = None):
        self.seq_len = seq_len
        self.max_rows = max_rows
        self.rows: list[list[Encoded]] = [[]]
        self._used = 0

    def add(self, sample: Encoded) -> bool:
        """Place `sample`; False (nothing placed) when it would open a row past `max_rows`.

        A sample longer than seq_len is an error (encode with a smaller text budget)."""
        n = len(sample)
        if n > self.seq_len:
            raise ValueError(f"sample of {n} tokens does not fit seq_len {self.seq_len}")
        if self._used + n > self.seq_len:
            if self.max_rows is not None and len(self.rows) == self.max_rows:
                return False
            self.rows.append([])
            self._used = 0
        self.rows[-1].append(sample)
        self._used += n
        return True


class XGenMMProcessor:
    """Tokenizer + image transform + sample encoders + batch collation (padding or packing)."""

    def __init__(self, tokenizer, config: ModelConfig, *, anyres: bool = True, max_text_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.anyres = anyres
        self.max_text_tokens = max_text_tokens or config.max_text_tokens
        self.placeholder_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKEN)
        if self.placeholder_id != config.image_placeholder_id:
            raise ValueError(
                f"tokenizer maps {PLACEHOLDER_TOKEN!r} to {self.placeholder_id}, config expects {config.image_placeholder_id}"
            )
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_chunk_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
        self.end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        self.pad_id = tokenizer.pad_token_id
        self._control = control_pattern([*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()])
        self._mean = torch.tensor(config.image_mean).view(3, 1, 1)
        self._std = torch.tensor(config.image_std).view(3, 1, 1)

    @classmethod
    def from_config(cls, config: ModelConfig, *, phi3_dir: str | None = None, anyres: bool = True) -> "XGenMMProcessor":
        """Tiny: a tokenizer trained on the fly. phi3-mini: Phi-3's tokenizer from local files."""
        from .tokenizer import add_xgenmm_tokens, train_tiny_tokenizer

        if config.tokenizer == "tiny":
            tok = train_tiny_tokenizer(config.lang_model["vocab_size"])
        else:
            from .weights import load_phi3_tokenizer

            tok = add_xgenmm_tokens(load_phi3_tokenizer(phi3_dir))
        return cls(tok, config, anyres=anyres)

    # --- images ------------------------------------------------------------------------------
    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x.float() / 255.0 - self._mean) / self._std  # (3, S, S)

    def image_crops(self, image: Image.Image) -> torch.Tensor:
        """(n_crops, 3, S, S): base image first, then any-res crops (one crop without any-res)."""
        S = self.config.image_size
        if not self.anyres:
            return self._to_tensor(image.convert("RGB").resize((S, S), Image.Resampling.BICUBIC))[None]
        crops, _ = anyres_crops(image, self.config.anyres_grids, S)
        return torch.stack([self._to_tensor(c) for c in crops])

    # --- encoding ----------------------------------------------------------------------------
    def _encode(self, parts: Sequence[tuple[str, bool]], images: Sequence[Image.Image]) -> Encoded:
        """parts: (text, trained) in order, tokenized as ONE string (as the chat template would be),
        after BOS; each `<image>` token becomes its image's placeholders (images taken in order).
        A token is trained when it starts inside a trained part."""
        text = "".join(t for t, _ in parts)
        spans, pos = [], 0
        for t, train in parts:
            if train:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if ids.count(self.image_id) != len(images):
            raise UnencodableSample(f"text has {ids.count(self.image_id)} {IMAGE_TOKEN} markers but {len(images)} images")
        out = Encoded([], [])
        budget = self.max_text_tokens
        if self.tokenizer.bos_token_id is not None:
            out.input_ids.append(self.tokenizer.bos_token_id)
            out.labels.append(IGNORE_INDEX)
            budget -= 1
        next_image = iter(images)
        for tid, (a, _) in zip(ids, offsets):
            if budget <= 0:
                out.truncated = True
                break
            if tid == self.image_id:
                image = next(next_image)
                crops = self.image_crops(image)
                n = crops.shape[0] * self.config.num_latents
                out.input_ids += [self.placeholder_id] * n
                out.labels += [IGNORE_INDEX] * n
                out.images.append(crops)
                out.image_sizes.append(tuple(image.size))
                continue
            out.input_ids.append(tid)
            out.labels.append(tid if any(lo <= a < hi for lo, hi in spans) else IGNORE_INDEX)
            budget -= 1
        return out

    def plain(self, text: str, *, keep: tuple[str, ...] = ()) -> str:
        """Data text with every control-token spelling but `keep` escaped (`model.control_tokens`)."""
        return escape_control_tokens(text, keep=keep, pattern=self._control)

    def encode_caption(self, caption: str, image: Image.Image) -> Encoded:
        """Pretraining caption sample; loss on the caption and its end tokens."""
        end = END_OF_CHUNK_TOKEN + self.tokenizer.eos_token
        return self._encode([(IMAGE_TOKEN, False), (self.plain(caption), True), (end, True)], [image])

    def encode_interleaved(self, texts: Sequence[str | None], images: Sequence[Image.Image | None]) -> Encoded:
        """Interleaved document (parallel lists, one of text/image set at each position)."""
        if len(texts) != len(images):
            raise ValueError(f"texts and images differ in length ({len(texts)} vs {len(images)})")
        parts: list[tuple[str, bool]] = []
        seen_image = False
        for t, img in zip(texts, images):
            if (t is None) == (img is None):
                raise ValueError("each position of an interleaved document holds exactly one of text or image")
            if img is not None:
                parts.append((IMAGE_TOKEN, False))
                seen_image = True
            else:
                parts.append((self.plain(t), True))
                if seen_image:
                    parts.append((END_OF_CHUNK_TOKEN, True))
                    seen_image = False
        parts.append((self.tokenizer.eos_token, True))
        return self._encode(parts, [im for im in images if im is not None])

    def encode_chat(
        self,
        messages: Sequence[dict],
        images: Sequence[Image.Image] = (),
        *,
        add_generation_prompt: bool = False,
        system: str | None = DEFAULT_SYSTEM,
    ) -> Encoded:
        """Phi-3 chat; loss on assistant contents and their `<|end|>` only.

        `<image>` markers in the contents place the images; with none, each image is put as
        `<image> ` at the start of the first user turn. A default system turn is added when the
        messages have none (None disables it).
        """
        messages = [dict(m, content=self.plain(m["content"], keep=(IMAGE_TOKEN,))) for m in messages]
        n_markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if images and n_markers == 0:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("images given but the chat has no user turn")
            first_user["content"] = f"{IMAGE_TOKEN} " * len(images) + first_user["content"]
        if system is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        parts: list[tuple[str, bool]] = []
        for m in messages:
            role = m["role"]
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r}")
            train = role == "assistant"
            parts += [(f"<|{role}|>\n", False), (m["content"], train), ("<|end|>", train), ("\n", False)]
        if add_generation_prompt:
            parts.append(("<|assistant|>\n", False))
        return self._encode(parts, images)

    def encode_prompt(self, text: str, images: Sequence[Image.Image] = ()) -> Encoded:
        """Free text with `<image>` markers (no special tokens besides BOS), e.g. for generate."""
        return self._encode([(text, False)], images)

    # --- batching ----------------------------------------------------------------------------
    def _images_batch(self, samples: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        crops = [c for s in samples for c in s.images]
        if not crops:
            return {}
        c_max = max(c.shape[0] for c in crops)
        S = self.config.image_size
        pv = torch.zeros(len(crops), c_max, 3, S, S)
        for i, c in enumerate(crops):
            pv[i, : c.shape[0]] = c
        out = {"pixel_values": pv}
        if self.anyres:
            out["image_sizes"] = torch.tensor([sz for s in samples for sz in s.image_sizes], dtype=torch.long)
        return out

    def collate(self, samples: Sequence[Encoded], *, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad to the longest sample: input_ids, attention_mask, labels (B, T) + images.

        Images are ordered sample by sample, as the placeholders appear row-major in input_ids.
        Use padding_side="left" for batched generation.
        """
        T = max(len(s) for s in samples)
        ids = torch.full((len(samples), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), T), dtype=torch.long)
        for i, s in enumerate(samples):
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s.input_ids)
            labels[i, sl] = torch.tensor(s.labels)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **self._images_batch(samples)}

    def pack(self, samples: Sequence[Encoded], seq_len: int) -> dict[str, torch.Tensor]:
        """Greedy in-order packing into rows of seq_len: adds segment_ids (0 = padding, 1..k).

        A sample longer than seq_len is an error (encode with a smaller text budget).
        """
        packer = RowPacker(seq_len)
        for s in samples:
            packer.add(s)
        rows = packer.rows
        B = len(rows)
        ids = torch.full((B, seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
        seg = torch.zeros((B, seq_len), dtype=torch.long)
        for r, row in enumerate(rows):
            pos = 0
            for k, s in enumerate(row, start=1):
                ids[r, pos : pos + len(s)] = torch.tensor(s.input_ids)
                labels[r, pos : pos + len(s)] = torch.tensor(s.labels)
                seg[r, pos : pos + len(s)] = k
                pos += len(s)
        ordered = [s for row in rows for s in row]
        return {"input_ids": ids, "labels": labels, "segment_ids": seg, **self._images_batch(ordered)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- save / load -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Tokenizer files + processor_config.json (the model config lives in config.json)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(d))
        (d / PROCESSOR_FILE).write_text(json.dumps({"anyres": self.anyres, "max_text_tokens": self.max_text_tokens}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: ModelConfig | None = None) -> "XGenMMProcessor":
        from transformers import AutoTokenizer

        from blip3.core.errors import MissingWeightsError, UserError

        from .xgenmm import _first_line

        d = Path(directory)
        if not (d / PROCESSOR_FILE).is_file():
            raise MissingWeightsError(f"no {PROCESSOR_FILE} in {d}", field="model dir")
        if config is None:
            from .xgenmm import CONFIG_FILE, read_model_config

            config = read_model_config(d / CONFIG_FILE)
        anyres, max_text_tokens = _read_processor_config(d / PROCESSOR_FILE)
        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        # the tokenizers library raises a bare Exception on a tokenizer.json it cannot parse
        except Exception as e:  # noqa: BLE001 - every reading failure of user files is one line
            raise UserError(f"tokenizer files cannot be read ({type(e).__name__}: {_first_line(e)})", file=d) from None
        try:
            return cls(tok, config, anyres=anyres, max_text_tokens=max_text_tokens)
        except ValueError as e:  # the tokenizer does not fit the model config
            raise UserError(str(e), file=d) from None


def _read_processor_config(file: Path) -> tuple[bool, int]:
    """processor_config.json -> (anyres, max_text_tokens); a malformed one is one UserError."""
    from blip3.core.errors import UserError

    from .xgenmm import _first_line

    try:
        opts = json.loads(file.read_bytes())
    except ValueError as e:  # not JSON, not UTF-8
        raise UserError(f"not a processor config ({type(e).__name__}: {_first_line(e)})", file=file) from None
    if not isinstance(opts, dict):
        raise UserError(f"a processor config is a JSON object, not {type(opts).__name__}", file=file)
    anyres, max_text = opts.get("anyres"), opts.get("max_text_tokens")
    if not isinstance(anyres, bool):
        raise UserError(f"'anyres' must be true or false, not {anyres!r}"[:200], file=file)
    if not isinstance(max_text, int) or isinstance(max_text, bool) or max_text <= 0:
        raise UserError(f"'max_text_tokens' must be an integer > 0, not {max_text!r}"[:200], file=file)
    return anyres, max_text
