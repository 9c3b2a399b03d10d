"""XGenMM on the tiny config: image splice, Phi-3 equivalence, packing, gradients, save/load,
generate, LoRA scope."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip3.model.xgenmm import XGenMM
from tests.model_fixtures import build_tiny_model, noise_image, tiny_config, tiny_model, tiny_processor  # noqa: F401


@pytest.fixture(scope="module")
def mixed(tiny_processor):
    """Images at the start, middle and end, two images in one sample, and a text-only sample."""
    p = tiny_processor
    ims = [noise_image(70, 30, 1), noise_image(20, 64, 2), noise_image(40, 40, 3), noise_image(90, 20, 4)]
    samples = [
        p.encode_prompt("<image> a red bus", [ims[0]]),
        p.encode_prompt("left <image> middle <image> right", [ims[1], ims[2]]),
        p.encode_prompt("the end is an image <image>", [ims[3]]),
        p.encode_prompt("no image here at all", []),
    ]
    return samples, ims


def test_splice_puts_each_image_at_its_placeholders(tiny_model, tiny_processor, mixed):
    samples, ims = mixed
    batch = tiny_processor.collate(samples)
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = tiny_model.embed(ids, batch["pixel_values"], batch["image_sizes"])
        plain = tiny_model.lang_model.get_input_embeddings()(ids)
    slots = ids == tiny_model.config.image_placeholder_id
    assert torch.equal(embeds[~slots], plain[~slots])  # text untouched
    # the k-th image of the batch fills the k-th run of placeholders, row-major
    per_image = []
    for i in range(len(ims)):
        with torch.no_grad():
            per_image.append(tiny_model.encode_images(batch["pixel_values"][i : i + 1], batch["image_sizes"][i : i + 1]))
    assert torch.allclose(embeds[slots], torch.cat(per_image), atol=1e-5)
    # run lengths: n_crops x num_latents, and the positions the text put them in
    L = tiny_model.config.num_latents
    first = [s.input_ids.index(tiny_model.config.image_placeholder_id) for s in samples[:3]]
    assert first[0] == 1  # right after BOS: image at the start
    assert samples[2].input_ids[-1] == tiny_model.config.image_placeholder_id  # image at the end
    assert batch["pixel_values"].shape[0] == len(ims) == 4
    assert sum(s.input_ids.count(tiny_model.config.image_placeholder_id) for s in samples) == sum(
        c.shape[0] * L for s in samples for c in s.images
    )
    assert samples[3].images == [] and int(slots[3].sum()) == 0


def test_logits_align_with_input_ids_and_images_matter(tiny_model, tiny_processor, mixed):
    samples, _ = mixed
    batch = tiny_processor.collate(samples[:2])
    with torch.no_grad():
        out = tiny_model(**batch)
        other = batch["pixel_values"].clone()
        other[0] = -other[0]
        out2 = tiny_model(**{**batch, "pixel_values": other})
    assert out.logits.shape == (*batch["input_ids"].shape, tiny_model.config.lang_model["vocab_size"])
    first_img_end = samples[0].input_ids.index(tiny_model.config.image_placeholder_id)
    assert not torch.allclose(out.logits[0, -1], out2.logits[0, -1])  # text after image sees the image
    assert torch.allclose(out.logits[0, :first_img_end], out2.logits[0, :first_img_end])  # causal: not before
    assert torch.allclose(out.logits[1], out2.logits[1], atol=1e-5)  # other sample's images untouched


def test_placeholder_count_mismatch_is_an_error(tiny_model, tiny_processor, mixed):
    samples, _ = mixed
    batch = tiny_processor.collate(samples[2:3])  # ends with its image: cut into it
    with pytest.raises(ValueError, match="placeholder"):
        tiny_model(batch["input_ids"][:, :-3], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(batch["input_ids"])


def test_text_only_equals_hf_phi3(tiny_model):
    """The LLM is transformers' Phi3ForCausalLM: our path == calling it directly."""
    torch.manual_seed(1)
    ids = torch.randint(10, 500, (2, 33))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ours = tiny_model(ids, attention_mask=mask, labels=ids)
        lm = tiny_model.lang_model
        direct = lm(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=mask, labels=ids)
        by_ids = lm(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(ours.logits, direct.logits)
    assert torch.allclose(ours.logits, by_ids.logits, atol=1e-6)
    assert torch.allclose(ours.loss, by_ids.loss)


def _separate_logits(model, processor, samples):
    outs = []
    for s in samples:
        b = processor.collate([s])
        with torch.no_grad():
            outs.append(model(**{k: v for k, v in b.items() if k != "labels"}).logits[0])
    return outs


def test_packed_batch_equals_samples_run_separately(tiny_model, tiny_processor, mixed):
    p = tiny_processor
    samples, ims = mixed
    chat = p.encode_chat(
        [{"role": "user", "content": "what is <image>?"}, {"role": "assistant", "content": "a dog"}], [ims[2]]
    )
    caption = p.encode_caption("a photo of a cat", ims[0])
    pieces = [caption, samples[3], chat, samples[1]]
    seq = len(caption) + len(samples[3]) + len(chat) + 7  # the last sample opens a second row
    packed = p.pack(pieces, seq)
    assert packed["input_ids"].shape[0] == 2 and int(packed["segment_ids"].max()) == 3
    with torch.no_grad():
        out = tiny_model(**packed)
    sep = _separate_logits(tiny_model, p, pieces)
    seg = packed["segment_ids"]
    for row, ks in ((0, (1, 2, 3)), (1, (1,))):
        got = [out.logits[row][seg[row] == k] for k in ks]
        want = sep[:3] if row == 0 else sep[3:]
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert torch.allclose(g, w, atol=1e-4)
    # the loss sums exactly the per-sample token losses: nothing crosses a sample boundary
    total, count = 0.0, 0
    for s, logits in zip(pieces, sep):
        lab = torch.tensor(s.labels)
        total += F.cross_entropy(logits[:-1], lab[1:], ignore_index=-100, reduction="sum").item()
        count += int((lab[1:] != -100).sum())
    assert abs(out.loss.item() - total / count) < 1e-4


def test_padded_batch_equals_samples_run_separately(tiny_model, tiny_processor, mixed):
    samples, _ = mixed
    batch = tiny_processor.collate(samples)
    with torch.no_grad():
        out = tiny_model(**{k: v for k, v in batch.items() if k != "labels"})
    for i, w in enumerate(_separate_logits(tiny_model, tiny_processor, samples)):
        assert torch.allclose(out.logits[i, : len(w)], w, atol=1e-4)


def test_gradients_reach_resampler_and_llm_not_vit(tiny_config, tiny_processor, mixed):
    model = build_tiny_model(tiny_config, seed=3).train()
    assert not model.vision_encoder.training  # the frozen ViT stays in eval mode
    samples, ims = mixed
    batch = tiny_processor.collate([tiny_processor.encode_caption("a caption", ims[0]), samples[1]])
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert all(not p.requires_grad for p in model.vision_encoder.parameters())
    res = dict(model.vision_tokenizer.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in res.values())
    lm_grads = [p.grad for n, p in model.lang_model.named_parameters() if "layers" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in lm_grads)


def test_save_load_round_trip_gives_identical_logits(tmp_path, tiny_config, tiny_processor, mixed):
    from blip3.model.processor import XGenMMProcessor

    model = build_tiny_model(tiny_config, seed=5)
    model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    loaded = XGenMM.from_pretrained(tmp_path).eval()
    proc = XGenMMProcessor.from_pretrained(tmp_path)
    samples, ims = mixed
    a = proc.encode_prompt("left <image> middle <image> right", [ims[1], ims[2]])
    assert a.input_ids == samples[1].input_ids
    batch = proc.collate([a])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert not any(p.requires_grad for p in loaded.vision_encoder.parameters())


def test_generate_with_images(tiny_model, tiny_processor, mixed):
    _, ims = mixed
    p = tiny_processor
    prompts = [p.encode_chat([{"role": "user", "content": "<image> describe"}], [ims[0]], add_generation_prompt=True),
               p.encode_prompt("two <image> and <image>", [ims[1], ims[3]])]
    batch = p.collate(prompts, padding_side="left")
    new = tiny_model.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"],
        max_new_tokens=6, do_sample=False, pad_token_id=p.pad_id,
    )
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 6
    # greedy: the first new token is the argmax of the forward pass at the last prompt position
    single = p.collate(prompts[:1])
    with torch.no_grad():
        logits = tiny_model(**{k: v for k, v in single.items() if k != "labels"}).logits
    assert int(new[0, 0]) == int(logits[0, -1].argmax())
    assert isinstance(p.decode(new[0]), str)


def test_lora_pattern_targets_the_llm_alone(tiny_config):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(tiny_config)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r"lang_model.*(qkv_proj|o_proj|gate_up_proj|down_proj)"))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == 4 * tiny_config.lang_model["num_hidden_layers"]
    assert all(".lang_model." in n for n in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".lang_model." in n for n in trainable)
