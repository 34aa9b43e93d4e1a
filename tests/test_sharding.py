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
