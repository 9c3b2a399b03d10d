"""Model behaviours the README promises, on the tiny config: LoRA scope with the product's own
default pattern, per-segment positions in packed rows, and `blip3 model generate` output."""

from __future__ import annotations

import torch
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from tests.model_fixtures import build_tiny_model, noise_image, tiny_config, tiny_model, tiny_processor  # noqa: F401


def test_default_lora_targets_wrap_the_llm_projections_and_nothing_else(tiny_config):  # noqa: F811
    """The stage default (not a copy of its pattern): every Phi-3 projection, no resampler to_q/to_kv/to_out."""
    from peft import LoraConfig, get_peft_model

    from blip3.train.config import LoraConfig as StageLora

    model = build_tiny_model(tiny_config)
    resampler = {n for n, m in model.named_modules() if n.startswith("vision_tokenizer") and isinstance(m, torch.nn.Linear)}
    assert any(n.endswith(("to_q", "to_kv", "to_out")) for n in resampler)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=StageLora().target_modules))
    lora = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in wrapped.named_parameters() if ".lora_A" in n}
    layers = tiny_config.lang_model["num_hidden_layers"]
    expected = {f"lang_model.model.layers.{i}.{part}"
                for i in range(layers)
                for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert lora == expected
    assert not any(n.startswith(("vision_tokenizer", "vision_encoder")) for n in lora)


def test_position_ids_restart_at_each_packed_segment(tiny_model, tiny_processor):  # noqa: F811
    """RoPE hides a constant position offset from the logits, so look at the ids the LLM receives."""
    p = tiny_processor
    pieces = [p.encode_prompt("<image> a red bus", [noise_image(70, 30, 1)]),
              p.encode_prompt("no image here at all", []),
              p.encode_prompt("the end is an image <image>", [noise_image(90, 20, 4)])]
    seq = sum(len(s) for s in pieces) + 5
    packed = p.pack(pieces, seq)
    assert packed["input_ids"].shape[0] == 1
    seen = {}

    def grab(module, args, kwargs):
        seen["position_ids"] = kwargs.get("position_ids")

    handle = tiny_model.lang_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_model(**packed)
    finally:
        handle.remove()
    pos = seen["position_ids"]
    assert pos is not None
    seg = packed["segment_ids"][0].tolist()
    got = pos[0].tolist()
    for k, piece in enumerate(pieces, start=1):
        idx = [i for i, s in enumerate(seg) if s == k]
        assert len(idx) == len(piece)
        assert [got[i] for i in idx] == list(range(len(piece))), k


def test_model_generate_prints_the_generated_text(tmp_path):
    from blip3.model.processor import XGenMMProcessor
    from blip3.model.xgenmm import XGenMM

    runner = CliRunner()
    out = tmp_path / "tiny"
    assert runner.invoke(app, ["model", "init", str(out), "--config", "tiny", "--seed", "3"]).exit_code == 0
    Image.new("RGB", (90, 40), (10, 200, 30)).save(tmp_path / "a.png")
    r = runner.invoke(app, ["model", "generate", str(out), "--raw", "--prompt", "<image> what?",
                            "--image", str(tmp_path / "a.png"), "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output

    model = XGenMM.from_pretrained(out).eval()
    proc = XGenMMProcessor.from_pretrained(out, model.config)
    batch = proc.collate([proc.encode_prompt("<image> what?", [Image.open(tmp_path / "a.png").convert("RGB")])])
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"],
                         max_new_tokens=6, do_sample=False, eos_token_id=[proc.tokenizer.eos_token_id, proc.end_id],
                         pad_token_id=proc.pad_id)
    text = proc.decode(new[0])
    assert text.strip()  # the tiny random model says something
    assert r.output.strip() == text.strip()
