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
    """A transformers Siglip vision tower (its own activation, the tanh GELU) and open_clip's timm
    trunk for so400m (built by timm with the exact GELU), at a tiny size."""
    import timm
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(21)
    hf_cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, vision_use_head=True)
    assert hf_cfg.hidden_act == "gelu_pytorch_tanh"
    hf = SiglipVisionModel(hf_cfg).eval()
    trunk = timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0).eval()
    return hf, trunk


def test_released_siglip_names_map_onto_the_timm_tower():
    """Mapped by name and with SigLIP's tanh GELU, the timm trunk gives transformers' patch tokens
    and pooled output."""
    from blip3.model.vision import use_tanh_gelu

    hf, trunk = _tiny_siglip_pair()
    trunk.load_state_dict(weights.siglip_hf_to_timm(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        exact = trunk.forward_features(x)
        use_tanh_gelu(trunk)
        feats = trunk.forward_features(x)
        pooled = trunk.forward_head(feats)
    assert (exact - ref.last_hidden_state).abs().max() > 1e-4  # what timm's own activation gives
    assert torch.allclose(feats, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(pooled, ref.pooler_output, atol=1e-5)


def test_siglip_towers_are_built_with_the_tanh_gelu():
    """phi3-mini's open_clip SigLIP tower (built on the meta device: shapes only) uses the tanh
    GELU in every block and in its pooling head; the tiny non-SigLIP tower keeps its own."""
    from blip3.model.config import get_config
    from blip3.model.vision import build_vision_encoder

    with torch.device("meta"):
        visual = build_vision_encoder(get_config("phi3-mini"))
    gelus = [m for m in visual.trunk.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 27 + 1 and all(m.approximate == "tanh" for m in gelus)


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


# --- the authors' decoupled embedding and head (their own code, vendored) ----------------------

N_EXTRA = 3  # the release adds three tokens: <image>, <image placeholder>, <|endofchunk|>
# The release's Phi-3 table has 32064 rows but `initial_tokenizer_len` 32012: the authors' layers
# never read rows 32012.. . Same shape here: the tiny table has 512 rows, the tokenizer length is
# taken as 400, so a load that keeps the unused rows puts the added tokens in the wrong place.
INITIAL_TOKENIZER_LEN = 400


def released_donor(config, seed: int, T: int = INITIAL_TOKENIZER_LEN):
    """A tiny model whose LLM wears the authors' `DecoupledEmbedding` / `DecoupledLinear` (LAVIS
    xgen-mm, vendored), wrapped the way their `VLM.__init__` wraps Phi-3; random everywhere."""
    from tests.vendor.lavis_decoupled import DecoupledEmbedding, DecoupledLinear

    donor = build_tiny_model(config, seed=seed)
    lm = donor.lang_model
    lm.set_input_embeddings(DecoupledEmbedding(max_original_id=T - 1, num_additional_embeddings=N_EXTRA,
                                               _weight=lm.get_input_embeddings().weight,
                                               pad_token_id=config.lang_model["pad_token_id"]))
    lm.lm_head = DecoupledLinear(max_original_id=T - 1, additional_out_features=N_EXTRA, _weight=lm.lm_head.weight,
                                 _bias=None)  # Phi-3's head has no bias: the authors' layer makes one
    with torch.no_grad():
        for p in (lm.lm_head.bias, lm.lm_head.additional_fc.weight, lm.lm_head.additional_fc.bias):
            p.normal_()
    return donor.eval()


def _save_released(donor, path, T: int | None = INITIAL_TOKENIZER_LEN):
    """The release's files: safetensors under `vlm.` and, next to them, its config.json."""
    import json

    from safetensors.torch import save_file

    state = {f"vlm.{k}": v.clone().contiguous() for k, v in donor.state_dict().items() if not k.startswith("vision_encoder.")}
    save_file(state, str(path))
    if T is not None:
        (path.parent / "config.json").write_text(json.dumps({"model_type": "xgenmm", "text_config": {
            "initial_tokenizer_len": T, "model_type": "phi3", "vocab_size": donor.config.lang_model["vocab_size"]}}))
    return state


@pytest.fixture
def released(tmp_path, tiny_config):
    donor = released_donor(tiny_config, seed=41)
    state = _save_released(donor, tmp_path / "released.safetensors")
    assert "vlm.lang_model.model.embed_tokens.additional_embedding.weight" in state
    assert {"vlm.lang_model.lm_head.bias", "vlm.lang_model.lm_head.additional_fc.weight"} <= set(state)
    assert state["vlm.lang_model.model.embed_tokens.weight"].shape[0] > INITIAL_TOKENIZER_LEN
    return donor, tmp_path / "released.safetensors"


def test_added_tokens_read_the_additional_rows(released, tiny_config):
    """ids T, T+1, T+2 embed with the additional rows and their logits come from additional_fc;
    the base rows T.. of the release's table are gone."""
    import copy

    donor, path = released
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=42)
    weights.load_released_state_dict(model, str(path))
    T = INITIAL_TOKENIZER_LEN
    emb, head = model.lang_model.get_input_embeddings().weight, model.lang_model.lm_head
    theirs_emb, theirs_head = donor.lang_model.get_input_embeddings(), donor.lang_model.lm_head
    assert emb.shape[0] == head.weight.shape[0] == T + N_EXTRA == model.config.lang_model["vocab_size"]
    assert torch.equal(emb[:T], theirs_emb.weight[:T])
    assert torch.equal(emb[T:], theirs_emb.additional_embedding.weight)
    assert torch.equal(head.weight[T:], theirs_head.additional_fc.weight)
    assert torch.equal(head.bias[T:], theirs_head.additional_fc.bias)
    assert torch.equal(head.bias[:T], theirs_head.bias[:T])


def test_released_decoupled_layers_give_the_same_logits(released, tiny_config, tiny_processor):
    """Text ids on both sides of the original vocabulary, then with any-res images: logits equal."""
    import copy

    from tests.model_fixtures import noise_image

    donor, path = released
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=42)
    model.vision_encoder.load_state_dict(donor.vision_encoder.state_dict())  # the tower: SigLIP names, tested above
    report = weights.load_released_state_dict(model, str(path))
    assert report["skipped"] == []
    T = INITIAL_TOKENIZER_LEN
    assert model.lang_model.lm_head.bias is not None and model.config.lm_head_bias
    assert model.lang_model.get_input_embeddings().padding_idx == tiny_config.lang_model["pad_token_id"]

    ids = torch.tensor([[1, 7, T - 1, T, 9, T + 2, T + 1, 3]])  # the last base id, then the added ones
    with torch.no_grad():
        ref, got = donor(ids).logits, model(ids).logits
    assert ref.shape[-1] == got.shape[-1] == T + N_EXTRA
    assert torch.allclose(got, ref, atol=1e-4, rtol=0)

    p = tiny_processor
    batch = p.collate([p.encode_prompt("<image> a red square", [noise_image(70, 20, 1)]),
                       p.encode_prompt("<image> and <image> two", [noise_image(30, 90, 2), noise_image(40, 40, 3)])])
    ids = batch["input_ids"].clone()
    ids[ids >= T] = 7  # the tiny BPE's ids above T do not exist in this layout
    ids[0, -1] = T + 1  # one additional token in the image sample too
    kwargs = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with torch.no_grad():
        ref, got = donor(ids, **kwargs).logits, model(ids, **kwargs).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=0)


def test_loaded_release_saves_and_reloads(released, tiny_config, tmp_path):
    """The biased, enlarged head survives save_pretrained / from_pretrained."""
    import copy

    from blip3.model.xgenmm import XGenMM

    donor, path = released
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=43)
    weights.load_released_state_dict(model, str(path))
    model.save_pretrained(tmp_path / "saved")
    again = XGenMM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[1, 5, INITIAL_TOKENIZER_LEN + 2]])
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, donor(ids).logits, atol=1e-4, rtol=0)


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


def _phi3_shaped_tokenizer(n: int):
    """A tokenizer of `n` tokens whose pad is its eos, as Phi-3's (32011 tokens): the authors'
    factory adds `<pad>` to it, so its length becomes their `initial_tokenizer_len`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n - 1)} | {"<|endoftext|>": n - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_our_added_token_ids_are_the_releases():
    """Phi-3-shaped tokenizer + our additions: `<pad>` is T-1 and `<image>`, `<image placeholder>`,
    `<|endofchunk|>` are T, T+1, T+2, the rows the release trained them in."""
    from blip3.model.config import get_config
    from blip3.model.tokenizer import add_xgenmm_tokens

    T = 40
    tok = add_xgenmm_tokens(_phi3_shaped_tokenizer(T - 1))
    assert tok.pad_token_id == T - 1 and len(tok) == T + N_EXTRA
    assert [tok.convert_tokens_to_ids(t) for t in ("<image>", "<image placeholder>", "<|endofchunk|>")] == [T, T + 1, T + 2]
    weights.check_released_tokens(tok, T)
    assert get_config("phi3-mini").image_placeholder_id == 32012 + 1  # the release's T is 32012
    with pytest.raises(weights.ReleasedLayoutError, match="'<image>' to 40, the release to 41"):
        weights.check_released_tokens(tok, T + 1)


@pytest.mark.parametrize(
    "config_text, message",
    [
        (None, "need the release's config.json"),
        ("{not json", "no text_config.initial_tokenizer_len"),
        ('{"text_config": {"vocab_size": 512}}', "no text_config.initial_tokenizer_len"),
        ('{"text_config": {"initial_tokenizer_len": "400"}}', "must be a positive integer"),
        ('{"text_config": {"initial_tokenizer_len": 0}}', "must be a positive integer"),
        ('{"text_config": {"initial_tokenizer_len": 513}}', "exceeds the base embedding's 512 rows"),
    ],
)
def test_the_release_config_is_read_or_refused_in_one_line(tmp_path, tiny_config, config_text, message):
    import copy

    donor = released_donor(tiny_config, seed=45)
    _save_released(donor, tmp_path / "released.safetensors", T=None)
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    model = build_tiny_model(copy.deepcopy(tiny_config), seed=46)
    with pytest.raises(weights.ReleasedLayoutError, match=message) as e:
        weights.load_released_state_dict(model, str(tmp_path / "released.safetensors"))
    assert "\n" not in str(e.value)


def _released_with_tower(tmp_path, tiny_config, edit):
    """A released file with a Siglip tower, edited by `edit(state)`; the model to load it into."""
    from safetensors.torch import save_file

    hf, trunk = _tiny_siglip_pair()
    model = build_tiny_model(tiny_config, seed=32)
    model.vision_encoder.trunk = trunk
    donor = build_tiny_model(tiny_config, seed=33)
    state = {f"vlm.{k}": v.clone() for k, v in donor.state_dict().items() if not k.startswith("vision_encoder.")}
    state |= {f"vlm.vision_encoder.{k}": v.clone() for k, v in hf.state_dict().items()}
    edit(state)
    save_file(state, str(tmp_path / "released.safetensors"))
    return model, tmp_path / "released.safetensors"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("vlm.vision_encoder.post_layernorm.weight"), r"missing: \['vision_encoder.post_layernorm.weight'\]"),
        (lambda s: s.pop("vlm.vision_encoder.encoder.layers.1.self_attn.k_proj.bias"),
         r"missing: \['vision_encoder.encoder.layers.1.self_attn.k_proj.bias'\]"),
        (lambda s: s.update({"vlm.vision_encoder.encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 64)}),
         r"wrong shape: \['vision_encoder.encoder.layers.0.mlp.fc1.weight'\]"),
        (lambda s: s.update({"vlm.vision_encoder.encoder.layers.2.mlp.fc1.weight": torch.zeros(128, 64)}),
         r"unexpected: \['vision_encoder.encoder.layers.2.mlp.fc1.weight'\]"),
    ],
)
def test_a_bad_vision_key_is_one_line_naming_it_and_the_file(tmp_path, tiny_config, edit, message):
    """Missing, reshaped or extra tower keys: one line with the checkpoint key and the file, never
    a KeyError, torch's multi-line report, or an extra key silently dropped and listed as loaded."""
    model, path = _released_with_tower(tmp_path, tiny_config, edit)
    with pytest.raises(weights.ReleasedLayoutError, match=message) as e:
        weights.load_released_state_dict(model, str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
