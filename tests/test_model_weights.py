"""Real-weight loading from local files (tiny stand-ins written by the test): SigLIP via an
open_clip checkpoint, Phi-3 via a model directory, the released checkpoint's state dict; and the
one clear error when something is missing."""

from __future__ import annotations

import pytest
import torch

from blip3.core.errors import MissingWeightsError
from blip3.model import weights
from tests.model_fixtures import build_tiny_model, tiny_config, tiny_processor  # noqa: F401


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in (weights.SIGLIP_ENV, weights.PHI3_ENV, weights.XGENMM_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "resolve, var",
    [(weights.resolve_siglip, "BLIP3_SIGLIP_CKPT"), (weights.resolve_phi3_dir, "BLIP3_PHI3_DIR"), (weights.resolve_xgenmm, "BLIP3_XGENMM_CKPT")],
)
def test_missing_weights_name_the_env_var(empty_hf_cache, resolve, var, monkeypatch, tmp_path):
    with pytest.raises(MissingWeightsError, match=var):
        resolve()
    monkeypatch.setenv(var, str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match=var):
        resolve()


def test_missing_model_dir(tmp_path):
    from blip3.model.xgenmm import XGenMM

    with pytest.raises(MissingWeightsError, match="config.json"):
        XGenMM.from_pretrained(tmp_path)


def test_build_pretrained_from_local_files(empty_hf_cache, tmp_path, monkeypatch, tiny_config):
    """SigLIP ckpt + Phi-3 dir + released state dict, all found through the env vars."""
    import open_clip
    from safetensors.torch import save_file

    from blip3.model.vision import register_open_clip_config

    torch.manual_seed(11)
    register_open_clip_config(tiny_config.vision_model, tiny_config.vision_model_cfg)
    clip = open_clip.create_model(tiny_config.vision_model)
    torch.save(clip.state_dict(), tmp_path / "siglip.pt")
    donor = build_tiny_model(tiny_config, seed=12)  # plays Phi-3 and the released checkpoint
    donor.lang_model.save_pretrained(tmp_path / "phi3")
    released = {f"vlm.{k}": v.clone() for k, v in donor.state_dict().items() if not k.startswith("vision_encoder.")}
    released["vlm.vision_encoder.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)  # Siglip names: skipped
    save_file(released, str(tmp_path / "xgenmm.safetensors"))
    monkeypatch.setenv(weights.SIGLIP_ENV, str(tmp_path / "siglip.pt"))
    monkeypatch.setenv(weights.PHI3_ENV, str(tmp_path / "phi3"))
    monkeypatch.setenv(weights.XGENMM_ENV, str(tmp_path / "xgenmm.safetensors"))

    model = weights.build_pretrained(tiny_config)
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(model.vision_encoder.state_dict()[k], v)
    for k, v in donor.lang_model.state_dict().items():
        assert torch.equal(model.lang_model.state_dict()[k], v)
    assert not torch.equal(model.vision_tokenizer.latents, donor.vision_tokenizer.latents)  # random until released

    report = weights.load_released_state_dict(model)
    assert torch.equal(model.vision_tokenizer.latents, donor.vision_tokenizer.latents)
    assert report["skipped"] == ["vision_encoder.embeddings.patch_embedding.weight"]
    assert len(report["loaded"]) == len(released) - 1

    bad = {k: v for k, v in released.items() if "projection.bias" not in k}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.ReleasedLayoutError, match="projection.bias"):  # the resampler loads strictly
        weights.load_released_state_dict(model, str(tmp_path / "bad.safetensors"))


def _tiny_siglip_pair():
    """A transformers Siglip vision tower and open_clip's timm trunk for so400m, at a tiny size."""
    import timm
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(21)
    hf_cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, vision_use_head=True,
                                hidden_act="gelu")  # timm's so400m uses exact GELU, transformers' Siglip the tanh form
    hf = SiglipVisionModel(hf_cfg).eval()
    trunk = timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0).eval()
    return hf, trunk


def test_released_siglip_names_map_onto_the_timm_tower():
    """Mapped by name, the timm trunk gives the same patch tokens and pooled output."""
    hf, trunk = _tiny_siglip_pair()
    trunk.load_state_dict(weights.siglip_hf_to_timm(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        feats = trunk.forward_features(x)
        pooled = trunk.forward_head(feats)
    assert torch.allclose(feats, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(pooled, ref.pooler_output, atol=1e-5)


def test_released_checkpoint_fills_a_timm_backed_tower(tmp_path, tiny_config):
    """The whole released layout (Siglip tower, resampler, LLM under `vlm.`) loads into XGenMM."""
    from safetensors.torch import save_file

    from blip3.model.vision import patch_tokens

    hf, trunk = _tiny_siglip_pair()
    model = build_tiny_model(tiny_config, seed=30)
    model.vision_encoder.trunk = trunk  # open_clip's TimmModel shape: `.trunk` is the timm ViT
    donor = build_tiny_model(tiny_config, seed=31)
    released = {f"vlm.{k}": v.clone() for k, v in donor.state_dict().items() if not k.startswith("vision_encoder.")}
    released |= {f"vlm.vision_encoder.{k}": v.clone() for k, v in hf.state_dict().items()}
    save_file(released, str(tmp_path / "released.safetensors"))
    report = weights.load_released_state_dict(model, str(tmp_path / "released.safetensors"))
    assert report["skipped"] == [] and len(report["loaded"]) == len(released)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(patch_tokens(model.vision_encoder, x), hf(pixel_values=x).last_hidden_state, atol=1e-5)
    assert torch.equal(model.lang_model.lm_head.weight, donor.lang_model.lm_head.weight)


# --- the authors' decoupled embedding and head (our own reference implementation) -------------


class RefDecoupledEmbedding(torch.nn.Embedding):
    """Base table for ids < N; ids >= N read `additional_embedding` at id - N."""

    def __init__(self, base: torch.nn.Embedding, n_extra: int):
        super().__init__(base.num_embeddings, base.embedding_dim)
        self.weight.data.copy_(base.weight.data)
        self.additional_embedding = torch.nn.Embedding(n_extra, base.embedding_dim)

    def forward(self, ids):
        n = self.num_embeddings
        extra = ids >= n
        out = torch.nn.functional.embedding(ids.masked_fill(extra, 0), self.weight)
        out[extra] = self.additional_embedding(ids[extra] - n)
        return out


class RefDecoupledLinear(torch.nn.Linear):
    """Biased base head, and `additional_fc` whose logits follow the base vocabulary's."""

    def __init__(self, base: torch.nn.Linear, n_extra: int):
        super().__init__(base.in_features, base.out_features, bias=True)
        self.weight.data.copy_(base.weight.data)
        self.additional_fc = torch.nn.Linear(base.in_features, n_extra, bias=True)

    def forward(self, x):
        return torch.cat([super().forward(x), self.additional_fc(x)], dim=-1)


N_EXTRA = 3  # the release adds three tokens


def released_donor(config, seed: int):
    """A tiny model whose LLM wears the decoupled layers, random everywhere (biases included)."""
    donor = build_tiny_model(config, seed=seed)
    lm = donor.lang_model
    lm.model.embed_tokens = RefDecoupledEmbedding(lm.model.embed_tokens, N_EXTRA)
    lm.lm_head = RefDecoupledLinear(lm.lm_head, N_EXTRA)
    with torch.no_grad():
        for p in (lm.lm_head.bias, lm.lm_head.additional_fc.bias):
            p.normal_()
    return donor.eval()


def _save_released(donor, path):
    from safetensors.torch import save_file

    state = {f"vlm.{k}": v.clone().contiguous() for k, v in donor.state_dict().items() if not k.startswith("vision_encoder.")}
    save_file(state, str(path))
    return state


@pytest.fixture
def released(tmp_path, tiny_config):
    donor = released_donor(tiny_config, seed=41)
    state = _save_released(donor, tmp_path / "released.safetensors")
    assert "vlm.lang_model.model.embed_tokens.additional_embedding.weight" in state
    assert {"vlm.lang_model.lm_head.bias", "vlm.lang_model.lm_head.additional_fc.weight"} <= set(state)
    return donor, tmp_path / "released.safetensors"


def test_released_decoupled_layers_give_the_same_logits(released, tiny_config, tiny_processor):
    """Text ids on both sides of the original vocabulary, then with any-res images: logits equal."""
    import copy

    from tests.model_fixtures import noise_image

    donor, path = released
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=42)
    model.vision_encoder.load_state_dict(donor.vision_encoder.state_dict())  # the tower: SigLIP names, tested above
    report = weights.load_released_state_dict(model, str(path))
    assert report["skipped"] == []
    n = tiny_config.lang_model["vocab_size"]
    assert model.lang_model.lm_head.bias is not None and model.config.lm_head_bias
    assert model.lang_model.get_input_embeddings().padding_idx == tiny_config.lang_model["pad_token_id"]
    assert model.config.lang_model["vocab_size"] == n + N_EXTRA

    ids = torch.tensor([[1, 7, n, 9, n + 2, n + 1, 3]])  # additional ids routed to their own rows
    with torch.no_grad():
        ref, got = donor(ids).logits, model(ids).logits
    assert ref.shape[-1] == n + N_EXTRA
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)

    p = tiny_processor
    batch = p.collate([p.encode_prompt("<image> a red square", [noise_image(70, 20, 1)]),
                       p.encode_prompt("<image> and <image> two", [noise_image(30, 90, 2), noise_image(40, 40, 3)])])
    ids = batch["input_ids"].clone()
    ids[0, -1] = n + 1  # one additional token in the image sample too
    kwargs = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with torch.no_grad():
        ref, got = donor(ids, **kwargs).logits, model(ids, **kwargs).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_loaded_release_saves_and_reloads(released, tiny_config, tmp_path):
    """The biased, enlarged head survives save_pretrained / from_pretrained."""
    import copy

    from blip3.model.xgenmm import XGenMM

    donor, path = released
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=43)
    weights.load_released_state_dict(model, str(path))
    model.save_pretrained(tmp_path / "saved")
    again = XGenMM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[1, 5, tiny_config.lang_model["vocab_size"] + 2]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, donor(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rename",
    [
        ("lang_model.lm_head.additional_fc.bias", "lang_model.lm_head.additional_fc.b"),
        ("lang_model.lm_head.bias", "lang_model.lm_head.offset"),
        ("lang_model.model.layers.1.mlp.down_proj.weight", "lang_model.model.layers.1.mlp.down.weight"),
        ("vision_tokenizer.latents", "vision_tokenizer.queries"),
        ("lang_model.model.norm.weight", "extra.norm.weight"),
    ],
)
def test_a_renamed_released_key_fails_loading(released, tiny_config, tmp_path, rename):
    import copy

    from safetensors.torch import load_file, save_file

    _, path = released
    state = load_file(str(path))
    old, new = (f"vlm.{k}" for k in rename)
    state[new] = state.pop(old)
    save_file(state, str(tmp_path / "renamed.safetensors"))
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=44)
    with pytest.raises(weights.ReleasedLayoutError):
        weights.load_released_state_dict(model, str(tmp_path / "renamed.safetensors"))
