"""Processor and tokenizers: special tokens, chat template and labels, captions, interleaved
documents, text budget, any-res off, and the Phi-3 id layout."""

from __future__ import annotations

import re

import pytest
import torch

from blip3.model.config import get_config
from blip3.model.processor import DEFAULT_SYSTEM, XGenMMProcessor
from blip3.model.tokenizer import SPECIAL_TOKENS, add_xgenmm_tokens, train_tiny_tokenizer
from tests.model_fixtures import build_tiny_model, noise_image, tiny_config, tiny_model, tiny_processor  # noqa: F401

IGN = -100


def collapse(text: str) -> str:
    return re.sub(r"(<image placeholder>)+", "<image>", text)


def test_tiny_tokenizer_is_deterministic_with_fixed_special_ids(tiny_processor, tiny_config):
    a = tiny_processor.tokenizer
    b = train_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) == tiny_config.lang_model["vocab_size"]
    assert [a.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    for t in SPECIAL_TOKENS:  # each special token is one id, never split
        assert a.encode(f"x{t}y", add_special_tokens=False).count(a.convert_tokens_to_ids(t)) == 1


def test_phi3_id_layout_after_additions():
    """On a Phi-3-shaped vocab (32000 + Phi-3's 11 added tokens), the additions land at 32011..32014."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(32000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="<|endoftext|>")
    phi3_added = ["<|endoftext|>", "<|assistant|>", *[f"<|placeholder{i}|>" for i in range(1, 5)], "<|system|>", "<|end|>",
                  "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    fast.add_special_tokens({"additional_special_tokens": phi3_added})
    assert fast.convert_tokens_to_ids("<|user|>") == 32010
    add_xgenmm_tokens(fast)
    ids = fast.convert_tokens_to_ids(["<pad>", "<image>", "<image placeholder>", "<|endofchunk|>"])
    assert ids == [32011, 32012, 32013, 32014] and fast.pad_token_id == 32011
    assert len(fast) <= get_config("phi3-mini").lang_model["vocab_size"]
    proc = XGenMMProcessor(fast, get_config("phi3-mini"))  # checks the placeholder id against the config
    assert proc.placeholder_id == 32013


def test_chat_matches_template_and_trains_only_assistant_turns(tiny_processor):
    p = tiny_processor
    ims = [noise_image(50, 30, 1), noise_image(30, 50, 2)]
    msgs = [
        {"role": "user", "content": "What is in <image>?"},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "And here <image>"},
        {"role": "assistant", "content": "Two cats."},
    ]
    enc = p.encode_chat(msgs, ims)
    rendered = p.tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM}, *msgs], tokenize=False)
    assert collapse(p.decode(enc.input_ids, skip_special_tokens=False)) == "<s>" + rendered
    # ids are the tokenizer's own reading of the rendered template (each image run -> one <image> id)
    ids, prev = [], None
    for i in enc.input_ids:
        if i == p.placeholder_id:
            if prev != p.placeholder_id:
                ids.append(p.image_id)
        else:
            ids.append(i)
        prev = i
    assert ids == [p.tokenizer.bos_token_id, *p.tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    trained = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGN]
    assert p.decode(trained, skip_special_tokens=False) == "A dog.<|end|>Two cats.<|end|>"
    assert all(l == IGN for i, l in zip(enc.input_ids, enc.labels) if i == p.placeholder_id)
    assert len(enc.input_ids) == len(enc.labels) and enc.image_sizes == [(50, 30), (30, 50)]


def test_chat_image_markers(tiny_processor):
    p = tiny_processor
    im = noise_image(40, 40)
    enc = p.encode_chat([{"role": "user", "content": "describe"}], [im], system=None, add_generation_prompt=True)
    text = collapse(p.decode(enc.input_ids, skip_special_tokens=False))
    assert text == "<s><|user|>\n<image> describe<|end|>\n<|assistant|>\n"
    assert all(l == IGN for l in enc.labels)
    with pytest.raises(ValueError, match="markers"):
        p.encode_chat([{"role": "user", "content": "<image> <image>"}], [im])


def test_caption_and_interleaved_layout(tiny_processor, tiny_config):
    p = tiny_processor
    L = tiny_config.num_latents
    im = noise_image(64, 32)  # 2:1 -> base + 2 crops
    cap = p.encode_caption("a photo of a dog", im)
    assert cap.input_ids[1 : 1 + 3 * L] == [p.placeholder_id] * (3 * L) and cap.images[0].shape == (3, 3, 32, 32)
    assert collapse(p.decode(cap.input_ids, skip_special_tokens=False)) == "<s><image>a photo of a dog<|endofchunk|><|endoftext|>"
    assert p.decode([i for i, l in zip(cap.input_ids, cap.labels) if l != IGN], skip_special_tokens=False) == (
        "a photo of a dog<|endofchunk|><|endoftext|>"
    )
    doc = p.encode_interleaved(["Intro.", None, "After one.", None, None, "After two."], [None, im, None, im, im, None])
    assert collapse(p.decode(doc.input_ids, skip_special_tokens=False)) == (
        "<s>Intro.<image>After one.<|endofchunk|><image>After two.<|endofchunk|><|endoftext|>"
    )  # (two adjacent images form one run of placeholders in the decoded text)
    assert len(doc.images) == 3
    with pytest.raises(ValueError):
        p.encode_interleaved(["a", None], [None, None])


def test_text_budget_never_cuts_an_image(tiny_config):
    p = XGenMMProcessor.from_config(tiny_config)
    first = len(p.tokenizer.encode("one two three four", add_special_tokens=False))
    p.max_text_tokens = 1 + first + 2  # BOS, the first text, then 2 tokens of the second
    im = noise_image(32, 32)
    enc = p.encode_interleaved(["one two three four", None, "five six seven eight", None], [None, im, None, im])
    n_text = sum(1 for i in enc.input_ids if i != p.placeholder_id)
    assert enc.truncated and n_text == p.max_text_tokens
    assert enc.input_ids.count(p.placeholder_id) == sum(c.shape[0] for c in enc.images) * tiny_config.num_latents
    assert len(enc.images) == 1  # the image after the cut is dropped with its text


def test_without_anyres_one_crop_and_no_sizes(tiny_config, tiny_model):
    p = XGenMMProcessor.from_config(tiny_config, anyres=False)
    enc = p.encode_caption("a wide one", noise_image(200, 20))
    assert enc.images[0].shape == (1, 3, 32, 32)
    batch = p.collate([enc])
    assert "image_sizes" not in batch
    assert enc.input_ids.count(p.placeholder_id) == tiny_config.num_latents  # one crop's latents
    with torch.no_grad():
        out = tiny_model(**batch)
        other = tiny_model(**p.collate([p.encode_caption("a wide one", noise_image(200, 20, seed=9))]))
    assert torch.isfinite(out.loss)
    # the loss is the caption tokens' next-token loss (placeholders never scored)
    labels = batch["labels"][0].masked_fill(batch["input_ids"][0] == p.placeholder_id, -100)
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[1:], ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-5)
    # and the single crop reaches the model: another image changes the text's logits
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])


def test_pack_refuses_a_sample_longer_than_a_row(tiny_processor):
    enc = tiny_processor.encode_prompt("a b c d e f g h", [])
    with pytest.raises(ValueError, match="does not fit"):
        tiny_processor.pack([enc], 3)
