"""Fixtures of the recaptioning tests: tiny real models built and saved here, loaded by the code
users run (`AutoModelForImageTextToText` / `AutoProcessor`, `AutoModelForCausalLM` / `AutoTokenizer`).

- a tiny LLaVA: a 2-layer CLIP vision tower and a 2-layer Llama, random weights, with the
  project's tiny byte-level BPE tokenizer (it has an `<image>` token) and a LLaVA processor
  carrying a chat template;
- a tiny Llama causal LM with the same tokenizer (its chat template is the Phi-3 format);
- a folder of shape images, some with an alt-text (`x.txt`) naming things, some without.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

#: A LLaVA-style chat template: one line per turn, the image as `<image>` before the text.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
ALT_TEXTS = {
    0: "Eiffel Tower at night, Paris",
    1: None,
    2: "A red circle by Acme Corp",
    3: "Barack Obama visits Berlin in 2013",
    4: None,
    5: "stock photo of a square",
}


def _tokenizer():
    from blip3.model.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(512)


def _text_config(tok, seed: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def build_tiny_llava(out: Path, seed: int = 0) -> Path:
    """Save a ~0.1M-parameter random LLaVA with its processor to `out`."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tok = _tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(tok, seed),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=16)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE).save_pretrained(out)
    return out


def build_tiny_llama(out: Path, seed: int = 1) -> Path:
    """Save a random 2-layer Llama causal LM with its tokenizer to `out`."""
    import torch
    from transformers import LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(_text_config(tok, seed)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_images(root: Path, n: int = 6) -> Path:
    """`n` shape images `img_00.png`...; those in ALT_TEXTS with a text get `img_NN.txt`."""
    colours = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 220, 30)]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (48 + 4 * i, 40), colours[i % len(colours)])
        ImageDraw.Draw(img).ellipse((8, 8, 30, 30), fill=colours[(i + 1) % len(colours)])
        img.save(root / f"img_{i:02d}.png")
        alt = ALT_TEXTS.get(i % len(ALT_TEXTS))
        if alt:
            (root / f"img_{i:02d}.txt").write_text(alt)
    return root


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")
