"""torchvision weight files (safetensors) into jaxcl's ResNets and VGGs.

The fixture (tests/fixtures/torch_weights, made by make_torch_weights_fixture.py in the
peers venv) holds four tiny networks built from torchvision's own modules, so their keys
are torchvision's, and the logits torch computes for a fixed batch in eval mode."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcl import checkpoint, models
from jaxcl.models import layers, torch_weights
from jaxcl.models import BasicBlock, Bottleneck, ResNet, VGG

FIXTURE = Path(__file__).parent / "fixtures" / "torch_weights"
TINY_VGG = dict(layout=(8, "M", 16, "M", 16), hidden=32, conv_bias=True, pool=3, dropout=0.5)
NETS = {  # the jaxcl twins of the fixture's networks
    "resnet_basic": functools.partial(ResNet, stage_sizes=(1, 2), block=BasicBlock, width=8, stem="imagenet"),
    "resnet_bottleneck": functools.partial(ResNet, stage_sizes=(1, 1), block=Bottleneck, width=8, stem="imagenet"),
    "vgg_bn": functools.partial(VGG, batch_norm=True, **TINY_VGG),
    "vgg": functools.partial(VGG, batch_norm=False, **TINY_VGG),
}


def reference(name):
    ref = load_file(FIXTURE / "reference.safetensors")
    return ref[f"{name}.x"].transpose(0, 2, 3, 1), ref[f"{name}.logits"]  # NCHW -> NHWC


def fresh(model, x):
    """(params, model_state) as a State holds them."""
    v = model.init(jax.random.PRNGKey(0), x)
    return {"params": v["params"]}, {k: v[k] for k in v if k != "params"}


def load(model, x, path, **kw):
    return torch_weights.load_pretrained(*fresh(model, x), str(path), model, **kw)


@pytest.mark.parametrize("name", sorted(NETS))
def test_logits_equal_torchvision_ones(name):
    x, logits = reference(name)
    model = NETS[name](num_outputs=10)
    params, state, n_params, n_stats = load(model, x, FIXTURE / f"{name}.safetensors", keep_head=True)
    file = load_file(FIXTURE / f"{name}.safetensors")
    assert n_params + n_stats == len([k for k in file if not k.endswith("num_batches_tracked")])
    out = np.asarray(model.apply({**params, **state}, x))
    assert np.abs(out - logits).max() <= 1e-4, np.abs(out - logits).max()


def test_timm_vgg_names_load_as_torchvision_ones(tmp_path):
    """timm's VGG keeps the classifier as convs named pre_logits.fc1/fc2 and head.fc."""
    x, logits = reference("vgg_bn")
    t = load_file(FIXTURE / "vgg_bn.safetensors")
    w0, w3, w6 = (t.pop(f"classifier.{i}.weight") for i in (0, 3, 6))
    t["pre_logits.fc1.weight"], t["pre_logits.fc2.weight"] = w0.reshape(32, 16, 3, 3), w3.reshape(32, 32, 1, 1)
    t["head.fc.weight"] = w6
    for i, new in ((0, "pre_logits.fc1"), (3, "pre_logits.fc2"), (6, "head.fc")):
        t[f"{new}.bias"] = t.pop(f"classifier.{i}.bias")
    save_file(t, tmp_path / "timm.safetensors")
    model = NETS["vgg_bn"](num_outputs=10)
    params, state, _, _ = load(model, x, tmp_path / "timm.safetensors", keep_head=True)
    np.testing.assert_allclose(model.apply({**params, **state}, x), logits, atol=1e-4)


def test_the_classifier_is_dropped_and_a_batch_norm_fills_every_task_row():
    x, _ = reference("resnet_basic")
    model = NETS["resnet_basic"](num_heads=3, num_outputs=4).clone(norm=functools.partial(layers.TaskNorm, 3))
    before = fresh(model, x)
    params, state, _, _ = torch_weights.load_pretrained(*before, str(FIXTURE / "resnet_basic.safetensors"), model)
    t = load_file(FIXTURE / "resnet_basic.safetensors")
    np.testing.assert_array_equal(params["params"]["head"]["kernel"], before[0]["params"]["head"]["kernel"])
    stem = params["params"]["stem"]
    np.testing.assert_array_equal(stem["conv"]["kernel"], t["conv1.weight"].transpose(2, 3, 1, 0))
    for task in range(3):
        np.testing.assert_array_equal(stem["norm"]["task_scale"][task], t["bn1.weight"])
        np.testing.assert_array_equal(state["batch_stats"]["layer2_0"]["shortcut"]["norm"]["task_var"][task],
                                      t["layer2.0.downsample.1.running_var"])


def test_a_kept_classifier_fills_every_head():
    x, _ = reference("vgg")
    params, _, _, _ = load(NETS["vgg"](num_heads=2, num_outputs=10), x, FIXTURE / "vgg.safetensors", keep_head=True)
    t = load_file(FIXTURE / "vgg.safetensors")
    for head in range(2):
        np.testing.assert_array_equal(params["params"]["head"]["kernel"][head], t["classifier.6.weight"].T)


def edited(tmp_path, name, edit):
    t = load_file(FIXTURE / f"{name}.safetensors")
    edit(t)
    save_file(t, tmp_path / "edited.safetensors")
    return tmp_path / "edited.safetensors"


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    x, _ = reference("resnet_basic")
    model = NETS["resnet_basic"](num_outputs=10)
    cases = [
        (lambda t: t.pop("layer2.1.bn2.running_mean"), r"missing \(1\): layer2\.1\.bn2\.running_mean"),
        (lambda t: t.update({"layer3.0.conv1.weight": np.zeros((1,), np.float32)}),
         r"unexpected \(1\): layer3\.0\.conv1\.weight"),
        (lambda t: t.update({"layer1.0.conv2.weight": np.zeros((8, 8, 1, 1), np.float32)}),
         r"wrong shape \(1\): layer1\.0\.conv2\.weight: \(8, 8, 1, 1\) in the file, this model needs \(8, 8, 3, 3\)"),
    ]
    for edit, message in cases:
        with pytest.raises(torch_weights.WeightsError, match=message):
            load(model, x, edited(tmp_path, "resnet_basic", edit))
    many = edited(tmp_path, "resnet_basic", lambda t: [t.pop(k) for k in list(t) if k.startswith("layer2.")])
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \(25\): (\S+; ){5}\.\.\.$"):
        load(model, x, many)


def test_a_pickle_is_refused_with_the_command_that_converts_it(tmp_path):
    x, _ = reference("vgg")
    for suffix in (".pth", ".pt", ".bin", ".ckpt"):
        path = tmp_path / f"w{suffix}"
        path.write_bytes(b"not read")
        with pytest.raises(torch_weights.WeightsError, match="never loads") as e:
            load(NETS["vgg"](), x, path)
        assert f"st.save_file(torch.load('{path}', weights_only=True), '{tmp_path / 'w.safetensors'}')" in str(e.value)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(torch_weights.WeightsError, match="cannot read it as safetensors"):
        load(NETS["vgg"](), x, tmp_path / "bad.safetensors")
    with pytest.raises(torch_weights.WeightsError, match="not MLP"):
        load(models.MLP(), x, FIXTURE / "vgg.safetensors")


def test_a_jaxcl_run_is_still_grafted(tmp_path):
    x, _ = reference("resnet_basic")
    model = NETS["resnet_basic"](num_outputs=10)
    src_params, src_state = fresh(model.clone(), x + 1.0)
    src_params = jax.tree_util.tree_map(lambda a: a + 1.0, src_params)
    ck = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints")
    ck.save(0, {"params": src_params, "model_state": src_state}, {})
    ck.close()
    before = fresh(model, x)
    params, state, n_params, n_stats = torch_weights.load_pretrained(*before, str(tmp_path / "run"), model)
    assert (n_params, n_stats) == (26 - 2, 16)  # all but the head's kernel and bias
    np.testing.assert_array_equal(params["params"]["stem"]["conv"]["kernel"], src_params["params"]["stem"]["conv"]["kernel"])
    np.testing.assert_array_equal(params["params"]["head"]["bias"], before[0]["params"]["head"]["bias"])


@pytest.mark.parametrize("name,expected", [("resnet34", 21_797_672), ("vgg16", 138_357_544),
                                           ("vgg16_bn", 138_365_992)])
def test_imagenet_models_have_torchvisions_parameter_counts(name, expected):
    v = jax.eval_shape(lambda: models._MODELS[name](num_outputs=1000).init(jax.random.PRNGKey(0),
                                                                            jnp.zeros((1, 224, 224, 3))))
    assert sum(a.size for a in jax.tree_util.tree_leaves(v["params"])) == expected
    assert name in models.DESCRIPTIONS
