"""Portable by construction: the loop's compiled calls lower for GPU and TPU with no such
device present (jax.export), so nothing CPU-only enters the program. Checked for the
scanned train call of every method vmapped over two seeds (the program of a multi-seed
run on GPU/TPU; it holds the one-seed program, vmapped), and for one method alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import methods, train


def export_train_call(make_config, name, seeds):
    # the chunk and run axis that loop.chunk/run_axis=auto pick on GPU and TPU (on CPU a conv
    # step is unrolled and runs mapped: tests/test_cpu_loop.py)
    sets = {"data__classes_per_task": 2, "loop__chunk": "scan", "loop__run_axis": "vmap"}
    if name in ("clr", "sgd_ll"):
        sets["model__name"] = "cnn"  # a conv trunk to reprogram
    if name in methods.on_a_vit():  # a ViT's token interface, on 2 blocks (model.depth; vit_cifar has 4)
        sets.update(model__name="vit_cifar", model__width=32, model__depth=2)
        sets.update({"coda_prompt": {"method__layers": "(0, 1)"},
                     "dualprompt": {"method__g_layers": "(0,)", "method__e_layers": "(1,)"},
                     "ranpac": {"method__projection": 64}}.get(name, {}))  # not the paper's 10^4 x 10^4 Gram
    S = train.setup(make_config(f"split_digits:method={name}", seeds=seeds, loop__steps_per_call=2,
                                data__on_device="true", **sets))
    state = jax.eval_shape(train._init_fn(S), train._keys(S))  # shapes are all an export needs
    B = S.config.batch_size
    xs = S.feed.train_items(S.pool_tasks(0), [np.arange(4 * B)] * S.R, range(2), B, 2)
    phase = S.method.phases(0)[0].name
    exported = jax.export.export(S.fns["train"](phase), platforms=["cuda", "tpu"])(
        state, S.src.get("train"), xs, jnp.int32(0))
    assert exported.platforms == ("cuda", "tpu")
    assert "stablehlo.while" in exported.mlir_module()  # the K steps are one loop in the program
    return exported


@pytest.mark.parametrize("name", methods.available())
def test_the_seed_vmapped_scanned_train_call_exports_for_cuda_and_tpu(make_config, name):
    # the vmapped program contains every primitive of the one-seed program (batched), so a
    # CPU-only piece of any method's step fails here; one export per method keeps it cheap
    export_train_call(make_config, name, "(0, 1)")


def test_the_one_seed_scanned_train_call_exports_for_cuda_and_tpu(make_config):
    # one seed takes the unvmapped branch of the loop's program (train.Setup: R == 1), the
    # same for every method
    export_train_call(make_config, "finetune", "()")
