"""The models of `blip3 recaption`: where they are, what they are, and batched generation.

Weights are never downloaded. A model is a local directory, found from the option (`--vlm`,
`--llm`), else an environment variable (`BLIP3_RECAPTION_VLM`, `BLIP3_RECAPTION_LLM`); nothing
found is one `MissingWeightsError` naming both. `resolve_model` runs in the driver, before Ray.

Two kinds of VLM directory:
- `hf`: any Hugging Face image-text-to-text model (`AutoModelForImageTextToText` + `AutoProcessor`:
  LLaVA, Idefics, Qwen-VL, ...);
- `blip3`: one of our own model directories (`blip3 model init`, or a training stage's output, its
  `final/` taken), generated with `model.xgenmm.XGenMM.generate`: the distillation loop's model.
The LLM is any local causal LM (`AutoModelForCausalLM` + `AutoTokenizer`).

Batched generation pads on the LEFT (decoder-only models continue the last position of each row),
so a sample's greedy output does not depend on the batch it is in (tested).

Every model is recorded by `ModelRef.info()`: its name (the Hub id in its config's
`_name_or_path`, else its directory's name), its kind, and a revision: the Hub commit when the directory is a Hugging Face cache snapshot, else `sha256:` of
config.json and, per weights file, its size and first and last MiB (a fingerprint, not a full
hash: cheap in the driver even for a 70B model, and it changes when the weights are replaced).

Backends: `transformers` (default) and `vllm` (its offline batched engine, `vllm.LLM`; HF models
only; import-guarded: asked for and not installed, one UserError).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from blip3.core.errors import MissingWeightsError, UserError

VLM_ENV = "BLIP3_RECAPTION_VLM"
LLM_ENV = "BLIP3_RECAPTION_LLM"
BACKENDS = ("transformers", "vllm")
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
_FINGERPRINT_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class GenerationSettings:
    """How one stage generates: the same for both backends."""

    max_new_tokens: int = 128
    do_sample: bool = False  # greedy by default: deterministic and resumable to the byte
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sampling: each batch's seed is derived from this and its first sample key
    batch_size: int = 8

    def check(self, prefix: str) -> "GenerationSettings":
        """Itself, or one UserError naming the bad option (`prefix` is `--` or `--merge-`)."""
        if self.max_new_tokens < 1:
            raise UserError("must be at least 1", field=f"{prefix}max-new-tokens")
        if self.batch_size < 1:
            raise UserError("must be at least 1", field=f"{prefix}batch-size")
        if not self.temperature > 0:
            raise UserError("must be > 0", field=f"{prefix}temperature")
        if not 0 < self.top_p <= 1:
            raise UserError("must be within (0, 1]", field=f"{prefix}top-p")
        return self

    def info(self) -> dict[str, Any]:
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed} if self.do_sample else {}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, **sampling,
                "batch_size": self.batch_size}


@dataclass(frozen=True)
class ModelRef:
    """A resolved local model: its directory, kind (`hf` | `blip3`), name and revision."""

    path: str
    kind: str
    name: str
    revision: str

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "model_kind": self.kind, "revision": self.revision}


def check_backend(backend: str) -> None:
    """One UserError for an unknown backend, or vllm asked for and not installed."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}", field="--backend")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("the vllm backend needs the `vllm` package on the GPU nodes (pip install vllm); "
                        "it is not installed here. Use --backend transformers", field="--backend")


def resolve_model(value: str | Path | None, *, env: str, option: str, what: str) -> ModelRef:
    """The model directory named by `option`, else `$env` (module doc); one error naming both."""
    source = option
    if not value:
        value, source = os.environ.get(env), f"${env}"
    if not value:
        raise MissingWeightsError(f"no {what} given: pass {option} DIR or set ${env}=DIR (a local model "
                                  "directory; nothing is downloaded)")
    p = Path(value).expanduser()
    if (p / "final" / "config.json").is_file():  # a training stage's output: its final model
        p = p / "final"
    config = p / "config.json"
    if not config.is_file():
        raise MissingWeightsError(f"{source}={value} holds no model (config.json missing): pass {option} DIR "
                                  f"or set ${env}=DIR", field=option)
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"not a model config ({type(e).__name__})", file=config) from None
    if not isinstance(cfg, dict):
        raise UserError("not a model config (not a JSON object)", file=config)
    kind = "blip3" if "lang_model" in cfg and (p / "processor_config.json").is_file() else "hf"
    return ModelRef(str(p.resolve()), kind, _model_name(str(cfg.get("_name_or_path") or ""), p), model_revision(p))


def _model_name(name_or_path: str, directory: Path) -> str:
    """A Hub id the config was saved from (`org/model`) as it is; else the directory's name."""
    hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    return name_or_path if hub_id else directory.resolve().name


def model_revision(path: str | Path) -> str:
    """The Hub commit of a cache snapshot, else a content fingerprint (see the module doc)."""
    resolved = Path(path).resolve()
    m = _SNAPSHOT.search(str(Path(path).absolute()).replace(os.sep, "/") + "/")
    if m:
        return m.group(1)
    h = hashlib.sha256()
    for f in sorted(resolved.rglob("*")):
        rel = f.relative_to(resolved).as_posix()
        if not f.is_file():
            continue
        if f.name == "config.json" and f.parent == resolved:
            h.update(b"config\0" + f.read_bytes())
        elif f.name.endswith(_WEIGHT_SUFFIXES):
            size = f.stat().st_size
            with f.open("rb") as fh:
                head = fh.read(_FINGERPRINT_BYTES)
                fh.seek(max(size - _FINGERPRINT_BYTES, 0))
                tail = fh.read(_FINGERPRINT_BYTES)
            h.update(f"{rel}\0{size}\0".encode() + head + tail)
    return "sha256:" + h.hexdigest()[:16]


def torch_device(device: str | None) -> str:
    """`device`, or cuda when there is one (a Ray actor given a GPU sees it), else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _sampling_kwargs(s: GenerationSettings) -> dict[str, Any]:
    if s.do_sample:
        return {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


# -- VLMs -------------------------------------------------------------------------------------
class HFVision:
    """A Hugging Face image-text-to-text model, batched through `generate` (left padding)."""

    def __init__(self, ref: ModelRef, settings: GenerationSettings, device: str | None = None):
        self.ref, self.settings, self.device = ref, settings, device
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch_device(self.device)
        self.processor = AutoProcessor.from_pretrained(self.ref.path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.ref.path, local_files_only=True, dtype=_dtype(self.device)).to(self.device).eval()

    def render(self, prompt: str) -> str:
        """The text the model is given for one image: its chat template holding one user turn of
        the image then `prompt`, or `<image>\\n{prompt}` for a processor without a template."""
        return render_vision_prompt(self.processor, prompt)

    def special_tokens(self) -> list[str]:
        return list(self.processor.tokenizer.all_special_tokens)

    def generate(self, images: Sequence[Image.Image], prompt: str) -> list[str]:
        import torch

        text = [self.render(prompt)] * len(images)
        enc = self.processor(images=list(images), text=text, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        tok = self.processor.tokenizer
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.settings.max_new_tokens,
                                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                      **_sampling_kwargs(self.settings))
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def render_vision_prompt(processor: Any, prompt: str) -> str:
    """See `HFVision.render` (a function, so the vLLM backend renders the same text)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"{image_token}\n{prompt}"


class Blip3Vision:
    """One of our model directories (the distillation loop's student), batched, left padding.

    Two prompt forms: with no prompt (None, the default for these directories), the caption
    format the model is pretrained on (`<s><image>`, the caption follows, ending at
    `<|endofchunk|>` or end-of-text), so a student trained on stage-1 captions is asked as it was
    taught; with a prompt, one user turn of the Phi-3 chat template, the image first (the SFT
    format, `XGenMMProcessor.encode_chat`), ending at `<|end|>` or end-of-text."""

    def __init__(self, ref: ModelRef, settings: GenerationSettings, device: str | None = None):
        self.ref, self.settings, self.device = ref, settings, device
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        from blip3.train.builders import load_model_dir

        self.device = torch_device(self.device)
        model, self.processor = load_model_dir(self.ref.path)
        self.model = model.to(self.device, _dtype(self.device)).eval()

    def special_tokens(self) -> list[str]:
        return list(self.processor.tokenizer.all_special_tokens)

    def _encode(self, image: Image.Image, prompt: str | None):
        from blip3.model.config import IMAGE_TOKEN

        p = self.processor
        if prompt is None:
            return p.encode_prompt(IMAGE_TOKEN, [image])
        return p.encode_chat([{"role": "user", "content": prompt}], [image], add_generation_prompt=True)

    def generate(self, images: Sequence[Image.Image], prompt: str | None) -> list[str]:
        import torch

        p = self.processor
        stop = p.end_of_chunk_id if prompt is None else p.end_id
        batch = {k: v.to(self.device) for k, v in
                 p.collate([self._encode(im, prompt) for im in images], padding_side="left").items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(_dtype(self.device))
        with torch.inference_mode():
            new = self.model.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                      batch.get("image_sizes"), max_new_tokens=self.settings.max_new_tokens,
                                      eos_token_id=[p.tokenizer.eos_token_id, stop], pad_token_id=p.pad_id,
                                      **_sampling_kwargs(self.settings))
        return [p.decode(row).strip() for row in new]


# -- LLMs -------------------------------------------------------------------------------------
class HFText:
    """A local causal LM, batched through `generate` (left padding)."""

    def __init__(self, ref: ModelRef, settings: GenerationSettings, device: str | None = None):
        self.ref, self.settings, self.device = ref, settings, device
        self.model: Any = None
        self.tokenizer: Any = None

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch_device(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.ref.path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            self.ref.path, local_files_only=True, dtype=_dtype(self.device)).to(self.device).eval()

    def render(self, prompt: str) -> str:
        """One user turn of the tokenizer's chat template, or the prompt itself without one."""
        return render_text_prompt(self.tokenizer, prompt)

    def special_tokens(self) -> list[str]:
        return list(self.tokenizer.all_special_tokens)

    def generate(self, prompts: Sequence[str]) -> list[str]:
        import torch

        texts = [self.render(p) for p in prompts]
        # the rendered text carries the template's own special tokens: none are added again
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.settings.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **_sampling_kwargs(self.settings))
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def render_text_prompt(tokenizer: Any, prompt: str) -> str:
    """See `HFText.render`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return (tokenizer.bos_token or "") + prompt


# -- vLLM -------------------------------------------------------------------------------------
class _VllmBase:
    """vLLM's offline engine (`vllm.LLM`), fed the same rendered prompts as transformers."""

    def __init__(self, ref: ModelRef, settings: GenerationSettings, device: str | None = None):
        self.ref, self.settings, self.device = ref, settings, device
        self.llm: Any = None
        self.params: Any = None

    def _load_engine(self, **kwargs: Any) -> None:
        from vllm import LLM, SamplingParams

        s = self.settings
        self.llm = LLM(model=self.ref.path, seed=s.seed, **kwargs)
        self.params = SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature if s.do_sample else 0.0,
                                     top_p=s.top_p if s.do_sample else 1.0, seed=s.seed if s.do_sample else None)

    def _run(self, requests: list[Any]) -> list[str]:
        outs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]


class VllmVision(_VllmBase):
    def load(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.ref.path, local_files_only=True)
        self._load_engine(limit_mm_per_prompt={"image": 1})

    def render(self, prompt: str) -> str:
        return render_vision_prompt(self.processor, prompt)

    def special_tokens(self) -> list[str]:
        return list(self.processor.tokenizer.all_special_tokens)

    def generate(self, images: Sequence[Image.Image], prompt: str) -> list[str]:
        text = self.render(prompt)
        return self._run([{"prompt": text, "multi_modal_data": {"image": im}} for im in images])


class VllmText(_VllmBase):
    def load(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.ref.path, local_files_only=True)
        self._load_engine()

    def render(self, prompt: str) -> str:
        return render_text_prompt(self.tokenizer, prompt)

    def special_tokens(self) -> list[str]:
        return list(self.tokenizer.all_special_tokens)

    def generate(self, prompts: Sequence[str]) -> list[str]:
        return self._run([self.render(p) for p in prompts])


def vision_model(ref: ModelRef, settings: GenerationSettings, backend: str, device: str | None = None):
    """The unloaded VLM runner of `ref` on `backend`."""
    if backend == "vllm":
        if ref.kind == "blip3":
            raise UserError("the vllm backend runs Hugging Face models; a blip3 model directory runs on "
                            "--backend transformers", field="--backend")
        return VllmVision(ref, settings, device)
    return (Blip3Vision if ref.kind == "blip3" else HFVision)(ref, settings, device)


def text_model(ref: ModelRef, settings: GenerationSettings, backend: str, device: str | None = None):
    """The unloaded LLM runner of `ref` on `backend`."""
    if ref.kind == "blip3":
        raise UserError("the merge model is a causal LM (AutoModelForCausalLM), not a blip3 model directory",
                        field="--llm")
    return (VllmText if backend == "vllm" else HFText)(ref, settings, device)
