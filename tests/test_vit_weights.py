"""timm's ViT weight files (safetensors) into jaxcl's ViT.

The fixture (tests/fixtures/vit, made by make_vit_fixture.py in the peers venv) is a tiny
ViT built from timm's own VisionTransformer class with random weights, and the logits timm
computes in eval mode at its own 16x16 images and, after timm resampled the position
embedding on loading, at 24x24 and 8x8."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcl.models import torch_weights, vit

FIXTURE = Path(__file__).parent / "fixtures" / "vit"
FILE = FIXTURE / "vit_tiny.safetensors"


def tiny(size, **kw):
    return vit.ViT(image_size=(size, size), patch=4, width=16, depth=2, heads=2, **kw)


def reference(size):
    ref = load_file(FIXTURE / "reference.safetensors")
    return ref[f"{size}.x"].transpose(0, 2, 3, 1), ref[f"{size}.logits"], ref[f"{size}.pos_embed"]


def load(model, x, path=FILE, **kw):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return torch_weights.load_pretrained({"params": shapes["params"]}, {}, str(path), model, **kw)


@pytest.mark.parametrize("size", [16, 24, 8], ids=["same-grid", "upsampled-6x6", "downsampled-2x2"])
def test_logits_equal_timms_with_the_position_embedding_resampled_as_timm_does(size):
    x, logits, pos = reference(size)
    model = tiny(size, num_outputs=10)
    params, _, n, _ = load(model, x, keep_head=True)
    assert n == len(load_file(FILE))  # every array of the file used
    np.testing.assert_allclose(params["params"]["pos_embed"], pos, atol=1e-6)
    out = np.asarray(model.apply(params, x))
    assert np.abs(logits).max() > 1.0
    assert np.abs(out - logits).max() <= 1e-4, np.abs(out - logits).max()


def test_the_imagenet_head_is_dropped_for_the_task_heads():
    x, _, _ = reference(16)
    model = tiny(16, num_heads=3, num_outputs=4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    fresh = model.init(jax.random.PRNGKey(0), x)
    params, _, _, _ = torch_weights.load_pretrained({"params": fresh["params"]}, {}, str(FILE), model)
    np.testing.assert_array_equal(params["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    t = load_file(FILE)
    qkv = params["params"]["blocks_1"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv, t["blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["params"]["norm"]["scale"], t["norm.weight"])
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure({"params": shapes["params"]})


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    x, _, _ = reference(16)
    t = load_file(FILE)
    t.pop("blocks.0.mlp.fc1.bias")
    t["blocks.0.attn.qkv.weight"] = t["blocks.0.attn.qkv.weight"][:, :8]
    t["patch_embed.proj.weight"] = t["patch_embed.proj.weight"][:, :2]  # a 2-channel file
    t["blocks.0.ls1.gamma"] = np.ones(16, np.float32)
    save_file(t, tmp_path / "bad.safetensors")
    with pytest.raises(torch_weights.WeightsError) as e:
        load(tiny(16, num_outputs=10), x, tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing (1): blocks.0.mlp.fc1.bias" in msg
    assert "unexpected (1): blocks.0.ls1.gamma" in msg
    assert "blocks.0.attn.qkv.weight: (48, 8) in the file, this model needs (48, 16)" in msg
    assert "patch_embed.proj.weight: (16, 2, 4, 4) in the file, this model needs (16, 3, 4, 4)" in msg


def test_a_pickle_is_refused(tmp_path):
    x, _, _ = reference(16)
    with pytest.raises(torch_weights.WeightsError, match="a pickle, which jaxcl never loads"):
        load(tiny(16), x, tmp_path / "vit.pth")


def test_resampling_an_unchanged_grid_is_the_identity_and_weights_sum_to_one():
    g = np.random.default_rng(0).normal(size=(5, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(torch_weights.resample_grid(g, (5, 5)), g, atol=1e-6)
    for n_in, n_out in ((14, 24), (14, 7), (4, 3)):
        np.testing.assert_allclose(torch_weights._aa_weights(n_in, n_out).sum(1), 1.0, atol=1e-12)
