"""`runtime.compile`: each decoder block compiled on its own gives the uncompiled model's loss and
gradients; a meta-built model loads its weights through the compile wrappers."""

from __future__ import annotations

import pytest
import torch

from tests.model_fixtures import build_tiny_model, noise_image, tiny_config, tiny_processor  # noqa: F401


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_blocks(tmp_path, tiny_config, tiny_processor):
    from blip3.model.weights import materialize
    from blip3.model.xgenmm import XGenMM
    from blip3.train.distributed import decoder_blocks, parallelize

    p = tiny_processor
    pieces = [p.encode_caption("a photo of a cat", noise_image(40, 40, 1)), p.encode_prompt("no image here", []),
              p.encode_caption("a wide picture", noise_image(70, 30, 2))]
    batch = p.pack(pieces, len(pieces[0]) + len(pieces[1]) + 2)
    build_tiny_model(tiny_config, seed=4).save_pretrained(tmp_path / "m")

    def grads(model):
        model.train().zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n.replace("._orig_mod", ""): q.grad for n, q in model.named_parameters() if q.grad is not None}

    eager_loss, eager_grads = grads(XGenMM.from_pretrained(tmp_path / "m"))
    model, weights = XGenMM.empty_from_pretrained(tmp_path / "m")
    parallelize(model, ac=False, compile=True, fsdp=False, bf16=False)
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in decoder_blocks(model))
    materialize(model, weights, torch.device("cpu"))
    loss, got = grads(model)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert got.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        assert (got[name] - g).norm() <= 1e-4 * g.norm().clamp_min(1e-12), name
