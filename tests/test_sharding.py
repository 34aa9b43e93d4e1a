"""Mesh and batch errors name the problem. The same run on 1 device and on 8 virtual CPU
devices giving the same results and parameters (and a batch really split along the 8
devices) is test_distributed.py's test_data_parallel_and_fsdp_agree_with_one_device and
test_one_process_of_eight_devices_splits_the_batch_...: its one process of 8 devices runs
every several-device check, so that this file starts no process of its own."""
import pytest

from jaxcl import sharding


def test_mesh_and_batch_errors_name_the_problem():
    with pytest.raises(sharding.ShardingError, match="mesh.data: asked for 99 x mesh.fsdp 1 = 99 devices, 1 visible"):
        sharding.make_mesh(99)


def test_bytes_of_an_abstract_state_are_those_of_the_placed_state():
    """``bytes_per_device(abstract, shardings)`` (what the benchmarks count for models too
    big to build here) is what the same state weighs once placed."""
    import jax
    import jax.numpy as jnp

    tree = {"w": jnp.ones((64, 32)), "b": jnp.zeros((32,), jnp.bfloat16), "n": jnp.int32(3)}
    mesh = sharding.make_mesh(1)
    sh = sharding.state_shardings(jax.eval_shape(lambda: tree), mesh, min_bytes=0)
    placed = sharding.bytes_per_device(jax.device_put(tree, sh))
    assert sharding.bytes_per_device(jax.eval_shape(lambda: tree), sh) == placed
    assert placed == {"total": 64 * 32 * 4 + 32 * 2 + 4, "per_device_max": 64 * 32 * 4 + 32 * 2 + 4, "devices": 1}
