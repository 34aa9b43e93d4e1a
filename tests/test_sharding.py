"""The same run on 1 device and on 8 virtual CPU devices gives the same results."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, orbax.checkpoint as ocp
    import jaxcl
    from jaxcl import config as C
    from jaxcl.checkpoint import Checkpointer
    assert jax.device_count() == 8, jax.devices()
    from jaxcl import sharding
    b = sharding.shard_batch({"x": np.zeros((16, 3))}, sharding.make_mesh(8))
    assert b["x"].sharding.shard_shape(b["x"].shape) == (2, 3)  # really split along the batch
    try:
        sharding.check_batch(12, sharding.make_mesh(8))
        raise AssertionError("batch 12 on 8 devices was accepted")
    except sharding.ShardingError as e:
        assert "batch_size=12 is not divisible by the 8 devices" in str(e), e
    out = {}
    for n in (1, 8):
        c = C.override(jaxcl.get_config("split_digits:method=ewc"),
                       ["epochs=2", "num_tasks=3", "batch_size=16", "eval_batch_size=64", f"mesh.data={n}",
                        "log.progress=false", "log.plots=false", "log.tensorboard=false"])
        wd = f"{sys.argv[1]}/mesh{n}"
        r = jaxcl.run(c, wd, echo=lambda s: None)
        ck = Checkpointer(f"{wd}/checkpoints")
        st = ocp.StandardCheckpointer().restore(ck.directory / str(ck.latest()) / "state")
        out[n] = {"R": r["accuracy_matrix"], "devices": r["devices"]["count"],
                  "params": [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(st["params"])]}
    print("RESULT" + json.dumps(out))
""")


def test_one_device_and_eight_virtual_devices_agree(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    one, eight = out["1"], out["8"]
    assert one["devices"] == 1 and eight["devices"] == 8
    np.testing.assert_allclose(np.asarray(one["R"]), np.asarray(eight["R"]), atol=1.5 / 72)  # at most a sample
    for a, b in zip(one["params"], eight["params"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_mesh_and_batch_errors_name_the_problem():
    import pytest

    from jaxcl import sharding

    with pytest.raises(sharding.ShardingError, match="mesh.data: asked for 99 x mesh.fsdp 1 = 99 devices, 1 visible"):
        sharding.make_mesh(99)
