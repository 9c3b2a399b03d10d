"""`runtime.attention: flex` (a FlexAttention block mask built from segment_ids) against the dense
4D-mask path on the tiny model: packed rows with several samples each, logits and gradients."""

from __future__ import annotations

import pytest
import torch

from blip3.model.attention import attention_of, packed_block_mask, set_attention
from blip3.model.xgenmm import packing_mask
from tests.model_fixtures import build_tiny_model, noise_image, tiny_config, tiny_processor  # noqa: F401


@pytest.fixture(scope="module")
def packed(tiny_processor):
    """Two rows of 2 and 3 samples (images inside), the second ending in padding (segment 0)."""
    p = tiny_processor
    ims = [noise_image(70, 30, 1), noise_image(20, 64, 2), noise_image(40, 40, 3)]
    chat = p.encode_chat([{"role": "user", "content": "what is <image>?"}, {"role": "assistant", "content": "a dog"}],
                         [ims[2]])
    pieces = [p.encode_caption("a photo of a cat", ims[0]), p.encode_prompt("no image here at all", []), chat,
              p.encode_caption("a tall narrow picture", ims[1]), p.encode_prompt("short", [])]
    seq = len(pieces[0]) + len(pieces[1]) + len(pieces[2]) + 1
    batch = p.pack(pieces, seq)
    seg = batch["segment_ids"]
    assert seg.shape[0] == 2 and all(len(set(r.tolist()) - {0}) >= 2 for r in seg)
    assert bool((seg == 0).any())  # padding is part of the comparison
    return batch


def _run(model, batch, attention: str, *, grad: bool):
    set_attention(model.lang_model, attention)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(**batch)
    if not grad:
        return out.logits, out.loss, {}
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_flex_block_mask_keeps_exactly_the_dense_mask():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]])
    dense, _ = packing_mask(seg, torch.float32)
    mask_mod = packed_block_mask(seg).mask_mod
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(8), torch.arange(8), indexing="ij")
    keep = mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(keep, dense[:, 0] == 0)


def test_flex_packed_logits_equal_dense(tiny_config, packed):
    model = build_tiny_model(tiny_config, seed=1)
    dense_logits, dense_loss, _ = _run(model, packed, "dense", grad=False)
    flex_logits, flex_loss, _ = _run(model, packed, "flex", grad=False)
    assert attention_of(model.lang_model) == "flex"
    real = packed["segment_ids"] > 0
    assert torch.allclose(flex_logits[real], dense_logits[real], atol=2e-5, rtol=1e-5)
    assert torch.allclose(flex_logits, dense_logits, atol=2e-5, rtol=1e-5)  # padding sees itself in both
    assert abs(flex_loss.item() - dense_loss.item()) < 1e-5


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_flex_packed_gradients_equal_dense(tiny_config, packed, device, monkeypatch):
    """On a GPU: the compiled FlexAttention kernel. On CPU torch refuses FlexAttention backward up
    front (a device check, not a missing formula): lifting that check runs torch's eager reference
    backward, the math the compiled kernels are tested against, so the gradients of our block
    mask are compared on CPU too. The trainer itself refuses `flex` for CPU training."""
    if device == "cpu":
        import torch.nn.attention.flex_attention as fa

        monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    model = build_tiny_model(tiny_config, seed=2).train().to(device)
    batch = {k: v.to(device) for k, v in packed.items()}
    dense_logits, dense_loss, dense_grads = _run(model, batch, "dense", grad=True)
    flex_logits, flex_loss, flex_grads = _run(model, batch, "flex", grad=True)
    assert torch.allclose(flex_logits, dense_logits, atol=1e-4, rtol=1e-4)
    assert abs(flex_loss.item() - dense_loss.item()) < 1e-5
    assert dense_grads.keys() == flex_grads.keys() and any(k.startswith("vision_tokenizer") for k in dense_grads)
    for name, g in dense_grads.items():
        rel = (flex_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-4, (name, rel.item())


def test_flex_unpacked_padded_rows_equal_dense(tiny_config, tiny_processor):
    """Rows without packing take transformers' own flex mask (padding), and agree with SDPA."""
    p = tiny_processor
    batch = p.collate([p.encode_caption("a photo of a cat", noise_image(40, 40, 5)), p.encode_prompt("hi", [])])
    assert bool((batch["attention_mask"] == 0).any())
    model = build_tiny_model(tiny_config, seed=3)
    dense_logits, _, _ = _run(model, batch, "dense", grad=False)
    flex_logits, _, _ = _run(model, batch, "flex", grad=False)
    real = batch["attention_mask"].bool()
    assert torch.allclose(flex_logits[real], dense_logits[real], atol=2e-5, rtol=1e-5)


def test_unknown_attention_is_refused(tiny_config):
    with pytest.raises(ValueError, match="dense, flex"):
        set_attention(build_tiny_model(tiny_config).lang_model, "varlen")
