"""XGenMM's own arithmetic pinned to exact values: the packing mask, positions and labels of packed
rows, the image tokens against a reference written here from the documented data flow, the forward
options (token log-probabilities, attention mask over packed rows), generate, and a model directory
on disk as user input (missing parts, bad config, bad weights: one line each).

Inputs are built by hand (token ids, pixel tensors), not through the processor, so the file runs
in seconds and each test names what it pins."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip3.core.errors import MissingWeightsError, UserError
from blip3.model.anyres import crop_patch_masks, plan_crops, release_token_groups
from blip3.model.config import ModelConfig
from blip3.model.vision import build_vision_encoder, patch_tokens
from blip3.model.xgenmm import (
    XGenMM,
    build_lang_model,
    labelled_tokens,
    packed_positions,
    packing_mask,
    read_weights,
    segment_starts,
    train_labels,
    weights_errors,
)
from tests.model_fixtures import build_tiny_model, tiny_config  # noqa: F401

IGNORE = -100


@pytest.fixture(scope="module")
def model(tiny_config):  # noqa: F811
    return build_tiny_model(tiny_config, seed=7)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """A `save_pretrained` directory of `model`."""
    d = tmp_path_factory.mktemp("saved")
    model.save_pretrained(d)
    return d


def _copy_dir(src, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


# --- packed rows: starts, mask, positions, labels ------------------------------------------------

SEG = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 1, 1, 1, 1]])


def test_segment_starts_mark_position_zero_and_every_change():
    assert segment_starts(SEG).tolist() == [
        [True, False, True, False, False, True, False],
        [True, False, False, True, False, False, False],
    ]


def test_packed_positions_restart_at_every_segment_and_in_the_padding():
    want = [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert packed_positions(SEG).tolist() == want
    assert packed_positions(SEG, segment_starts(SEG)).tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_mask_is_block_causal_and_padding_sees_itself_only(dtype):
    mask, pos = packing_mask(SEG, dtype)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == dtype
    B, T = SEG.shape
    want = torch.full((B, 1, T, T), torch.finfo(dtype).min, dtype=dtype)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                s_i, s_j = int(SEG[b, i]), int(SEG[b, j])
                if i == j or (s_i == s_j and s_i > 0 and j < i):
                    want[b, 0, i, j] = 0
    assert torch.equal(mask, want)
    assert pos.tolist() == packed_positions(SEG).tolist()
    # the rule, spelled out on row 0: token 4 (segment 2) sees 2..4; padding token 6 sees only itself
    assert (mask[0, 0, 4] == 0).tolist() == [False, False, True, True, True, False, False]
    assert (mask[0, 0, 6] == 0).tolist() == [False] * 6 + [True]
    assert torch.equal(packing_mask(SEG, dtype, segment_starts(SEG))[0], want)


def test_train_labels_drop_placeholders_padding_and_segment_starts():
    ids = torch.tensor([[1, 4, 4, 9, 1, 8, 0], [1, 7, 7, 1, 4, 6, 5]])
    labels = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 26, 27]])
    assert train_labels(ids, labels, 4).tolist() == [
        [11, IGNORE, IGNORE, 14, 15, 16, 17],
        [21, 22, 23, 24, IGNORE, 26, 27],
    ]
    assert train_labels(ids, labels, 4, SEG).tolist() == [
        [IGNORE, IGNORE, IGNORE, 14, 15, IGNORE, IGNORE],
        [IGNORE, 22, 23, IGNORE, IGNORE, 26, 27],
    ]
    assert labels[0, 0] == 11  # the input is not changed in place


def test_labelled_tokens_counts_shifted_labels_only():
    labels = torch.tensor([[7, IGNORE, 5, 6], [8, 9, IGNORE, IGNORE]])
    assert labelled_tokens(labels) == 3  # position 0 is never a target
    assert labelled_tokens(torch.full((2, 3), IGNORE)) == 0


# --- building --------------------------------------------------------------------------------------

def test_lm_head_bias_follows_the_config(tiny_config):  # noqa: F811
    import dataclasses

    assert build_lang_model(tiny_config).lm_head.bias is None
    biased = build_lang_model(dataclasses.replace(tiny_config, lm_head_bias=True))
    assert biased.lm_head.bias is not None and biased.lm_head.bias.shape == (tiny_config.lang_model["vocab_size"],)


def test_given_parts_are_used_as_they_are_and_the_vit_is_frozen(tiny_config):  # noqa: F811
    vit = build_vision_encoder(tiny_config).train()
    lm = build_lang_model(tiny_config)
    m = XGenMM(tiny_config, vision_encoder=vit, lang_model=lm)
    assert m.vision_encoder is vit and m.lang_model is lm
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    assert all(p.requires_grad for p in lm.parameters())


def test_train_mode_reaches_all_but_the_vit(tiny_config):  # noqa: F811
    m = build_tiny_model(tiny_config, seed=1)
    assert m.train() is m
    assert m.training and m.lang_model.training and m.vision_tokenizer.training
    assert not m.vision_encoder.training
    m.train(False)
    assert not m.lang_model.training and not m.vision_tokenizer.training and not m.vision_encoder.training


def test_num_params_counts_all_or_the_trained_ones(model):
    total = sum(p.numel() for p in model.parameters())
    vit = sum(p.numel() for p in model.vision_encoder.parameters())
    assert vit > 0
    assert model.num_params() == total
    assert model.num_params(trainable_only=True) == total - vit


# --- images ----------------------------------------------------------------------------------------

def _reference_tokens(model, pixel_values, image_sizes):
    """The module docstring's data flow, written out per image: present crops -> ViT patches ->
    grid crops regrouped as the released model does -> resampler with the crop key masks."""
    cfg = model.config
    out = []
    for i, (w, h) in enumerate(image_sizes.tolist()):
        plan = plan_crops((w, h), cfg.anyres_grids, cfg.image_size)
        with torch.no_grad():
            feats = patch_tokens(model.vision_encoder, pixel_values[i, : plan.n_crops])
            feats = torch.cat([feats[:1], release_token_groups(feats[1:], plan.rows, plan.cols)])
            mask = crop_patch_masks((w, h), plan, cfg.patch_size)
            out.append(model.vision_tokenizer(feats, mask).flatten(0, 1))
    return torch.cat(out)


def test_image_tokens_follow_the_documented_data_flow(model):
    cfg = model.config
    sizes = torch.tensor([[70, 30], [20, 64], [40, 40]])  # 1x3 and 2x1 grids (padded), 2x2 (exact)
    plans = [plan_crops(tuple(s), cfg.anyres_grids, cfg.image_size) for s in sizes.tolist()]
    assert [(p.rows, p.cols, p.n_crops) for p in plans] == [(1, 3, 4), (2, 1, 3), (2, 2, 5)]
    assert not crop_patch_masks((70, 30), plans[0], cfg.patch_size).all()  # a masked image is part of it
    torch.manual_seed(0)
    pv = torch.randn(3, 6, 3, cfg.image_size, cfg.image_size)  # crops past each image's count are noise
    with torch.no_grad():
        got = model.encode_images(pv, sizes)
    want = _reference_tokens(model, pv, sizes)
    assert got.shape == (12 * cfg.num_latents, cfg.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_image_sizes_every_crop_is_used_unmasked(model):
    cfg = model.config
    torch.manual_seed(1)
    pv = torch.randn(2, 2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        got = model.encode_images(pv)
        want = model.vision_tokenizer(patch_tokens(model.vision_encoder, pv.flatten(0, 1))).flatten(0, 1)
        one_crop = model.encode_images(pv[:, 0])  # (N, 3, S, S): one crop per image
        one_crop_5d = model.encode_images(pv[:, :1])
    assert got.shape == (2 * 2 * cfg.num_latents, cfg.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert one_crop.shape == (2 * cfg.num_latents, cfg.hidden_size)
    torch.testing.assert_close(one_crop, one_crop_5d, atol=0, rtol=0)


def test_image_sizes_needing_more_crops_than_given_is_an_error(model):
    cfg = model.config
    pv = torch.zeros(1, 2, 3, cfg.image_size, cfg.image_size)  # 1 image, 2 crops, 3 channels: all told apart
    with pytest.raises(ValueError, match="need 4 crops but pixel_values has 2"):
        model.encode_images(pv, torch.tensor([[70, 30]]))
    with torch.no_grad():  # exactly as many as needed is fine
        tokens = model.encode_images(torch.zeros(1, 4, 3, cfg.image_size, cfg.image_size), torch.tensor([[70, 30]]))
    assert tokens.shape[0] == 4 * cfg.num_latents


def test_placeholders_and_image_tokens_that_differ_name_both_counts(model):
    cfg = model.config
    ids = torch.tensor([[1] + [cfg.image_placeholder_id] * 60 + [20]])
    pv = torch.zeros(1, 4, 3, cfg.image_size, cfg.image_size)
    with pytest.raises(ValueError, match="input_ids hold 60 image placeholder tokens but the images give 64 "):
        model.embed(ids, pv, torch.tensor([[70, 30]]))


def test_embed_without_pixels_is_the_text_embedding(model):
    ids = torch.tensor([[1, 20, 30, 40]])
    plain = model.lang_model.get_input_embeddings()(ids)
    empty = torch.zeros(0, 1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        assert torch.equal(model.embed(ids), plain)
        assert torch.equal(model.embed(ids, empty), plain)


def test_embed_writes_the_images_over_the_placeholders_in_order(model):
    cfg = model.config
    L = cfg.num_latents
    P = cfg.image_placeholder_id
    sizes = torch.tensor([[70, 30], [64, 64]])  # 4 and 5 crops
    torch.manual_seed(2)
    pv = torch.randn(2, 5, 3, cfg.image_size, cfg.image_size)
    ids = torch.tensor([[1, 50] + [P] * 4 * L + [60] * 5 * L + [70], [1] + [P] * 5 * L + [80] * (4 * L + 2)])
    with torch.no_grad():
        got = model.embed(ids, pv, sizes)
        images = model.encode_images(pv, sizes)
        plain = model.lang_model.get_input_embeddings()(ids)
    slots = ids == P
    assert torch.equal(got[~slots], plain[~slots])
    assert torch.equal(got[0, 2 : 2 + 4 * L], images[: 4 * L])
    assert torch.equal(got[1, 1 : 1 + 5 * L], images[4 * L :])


# --- forward options -------------------------------------------------------------------------------

def _packed_batch():
    torch.manual_seed(3)
    ids = torch.randint(10, 500, (2, 12))
    seg = torch.tensor([[1] * 5 + [2] * 7, [1] * 4 + [2] * 4 + [3] * 4])
    return ids, seg


def test_attention_mask_zeroes_packed_segments(model):
    """A caller's attention mask over a packed row turns the masked tokens into padding (segment 0)."""
    ids, seg = _packed_batch()
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=attn, labels=ids, segment_ids=seg)
        want = model(ids, labels=ids, segment_ids=seg * attn)
        unmasked = model(ids, labels=ids, segment_ids=seg)
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=0, rtol=0)
    assert not torch.allclose(got.loss, unmasked.loss)  # the mask does change the loss


def test_token_logps_are_log_softmax_of_the_logits_at_the_next_label(model):
    ids, seg = _packed_batch()
    with torch.no_grad():
        logits = model(ids, segment_ids=seg).logits
        dense = model(ids, labels=ids, segment_ids=seg, token_logps="dense")
        chunked = model(ids, labels=ids, segment_ids=seg, token_logps="chunked")
    labels = train_labels(ids, ids, model.config.image_placeholder_id, seg)
    want_mask = labels[:, 1:] != IGNORE
    assert want_mask.tolist()[1] == [True, True, True, False, True, True, True, False, True, True, True]
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0] * want_mask
    for out in (dense, chunked):
        assert torch.equal(out.mask, want_mask)
        torch.testing.assert_close(out.logps, logp, atol=1e-5, rtol=1e-5)


def test_token_logps_needs_labels_and_a_known_implementation(model):
    ids, _ = _packed_batch()
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, token_logps="dense")
    with pytest.raises(ValueError, match="chunked or dense, got 'fast'"):
        model(ids, labels=ids, token_logps="fast")


# --- generate --------------------------------------------------------------------------------------

def _generate(model, ids, mask=None):
    kwargs = {} if mask is None else {"attention_mask": mask}
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def test_generate_honours_the_attention_mask_of_a_left_padded_batch(model):
    short, long = [1, 30, 31, 32], [1, 40, 41, 42, 43, 44, 45]
    ids = torch.tensor([[0] * 3 + short, long])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    seqs, logits = _generate(model, ids, mask)
    alone_seqs, alone_logits = _generate(model, torch.tensor([short]))  # no mask: all ones
    assert torch.equal(seqs[0], alone_seqs[0])
    torch.testing.assert_close(logits[0], alone_logits[0], atol=1e-4, rtol=1e-4)
    ones_seqs, ones_logits = _generate(model, torch.tensor([short]), torch.ones(1, 4, dtype=torch.long))
    assert torch.equal(ones_seqs, alone_seqs)
    torch.testing.assert_close(ones_logits, alone_logits, atol=0, rtol=0)


# --- a model directory on disk ---------------------------------------------------------------------

def test_save_pretrained_makes_missing_folders_and_overwrites(tmp_path, model, saved):
    d = tmp_path / "a" / "b"
    model.save_pretrained(d)
    model.save_pretrained(d)  # again, into the existing folder
    assert ModelConfig.from_dict(json.loads((d / "config.json").read_text())) == model.config
    assert (d / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_a_model_dir_missing_a_part_is_one_clear_error(tmp_path, saved, missing):
    d = _copy_dir(saved, tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(MissingWeightsError, match=r"model dir: no config\.json \+ model\.safetensors in"):
        XGenMM.from_pretrained(d)


@pytest.mark.parametrize("text, kind", [
    ("{not json", "JSONDecodeError"),
    ('{"name": "tiny"}', "TypeError"),  # required fields missing
    ('{"name": "tiny", "colour": 1}', "ValueError"),  # unknown field
    ("[1, 2]", "TypeError"),  # a JSON array, not an object
])
def test_a_bad_model_config_is_one_clear_error(tmp_path, saved, text, kind):
    d = _copy_dir(saved, tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(UserError) as e:
        XGenMM.empty_from_pretrained(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: not a model config ({kind}: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, kind", [
    ("lang_model", "phi3", "TypeError"),  # not a dict: once a traceback from deep in the build
    ("lang_model", {"vocab_size": 64}, "KeyError"),  # a dict without the sizes the build needs
    ("num_latents", "8", "TypeError"),
    ("num_latents", True, "TypeError"),
    ("lm_head_bias", 0, "TypeError"),
    ("vision_model", None, "TypeError"),
])
def test_a_config_field_of_the_wrong_kind_is_one_clear_error(tmp_path, saved, field, value, kind):
    d = _copy_dir(saved, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        XGenMM.from_pretrained(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: not a model config ({kind}: ")
    assert "\n" not in str(e.value)


def test_a_config_that_allows_none_takes_it(tmp_path, saved):
    d = _copy_dir(saved, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    assert config["vision_model_cfg"] is not None  # the tiny model registers its open_clip config
    XGenMM.empty_from_pretrained(d)  # the saved config passes the kind checks


def _assert_one_weights_error(e, file):
    msg = str(e)
    assert msg.startswith(f"{file}: weights cannot be loaded (")
    assert msg.count("weights cannot be loaded") == 1 and "\n" not in msg


def test_a_truncated_weights_file_is_one_clear_error(tmp_path, saved):
    d = _copy_dir(saved, tmp_path / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(UserError) as e:
        XGenMM.from_pretrained(d)
    _assert_one_weights_error(e.value, w)
    with pytest.raises(UserError) as e:
        read_weights(w)
    _assert_one_weights_error(e.value, w)
    assert "(SafetensorError: " in str(e.value)
    with pytest.raises(UserError) as e:
        read_weights(tmp_path / "absent.safetensors")
    _assert_one_weights_error(e.value, tmp_path / "absent.safetensors")
    assert "(FileNotFoundError: " in str(e.value)  # an OSError


@pytest.mark.parametrize("change", ["drop", "reshape"])
def test_weights_that_do_not_fit_the_model_are_one_clear_error(tmp_path, saved, change):
    d = _copy_dir(saved, tmp_path / "m")
    w = d / "model.safetensors"
    state = load_file(str(w))
    name = "vision_tokenizer.projection.weight"
    if change == "drop":
        del state[name]
    else:
        state[name] = torch.zeros(3, 3)
    save_file(state, str(w))
    with pytest.raises(UserError) as e:
        XGenMM.from_pretrained(d)
    _assert_one_weights_error(e.value, w)
    assert "RuntimeError: Error(s) in loading state_dict" in str(e.value)


def test_weights_errors_keep_a_worded_error_and_cut_the_first_line(tmp_path):
    f = tmp_path / "w.safetensors"
    with pytest.raises(UserError) as e, weights_errors(f):
        raise UserError("already worded", field="x")
    assert str(e.value) == "x: already worded"
    with pytest.raises(UserError) as e, weights_errors(f):
        raise ValueError("y" * 300 + "\nsecond line")
    assert str(e.value) == f"{f}: weights cannot be loaded (ValueError: {'y' * 200})"
    with pytest.raises(UserError) as e, weights_errors(f):
        raise RuntimeError()
    assert str(e.value) == f"{f}: weights cannot be loaded (RuntimeError: )"
    with pytest.raises(KeyError), weights_errors(f):  # a bug stays a traceback
        raise KeyError("k")
