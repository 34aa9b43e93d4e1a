"""State bytes per device of ViT runs, replicated over 2 devices against ``mesh.fsdp=2``
(issue 20): the whole training state (parameters, optimizer moments, trainable masks, the
method's trees) of an abstract init (``jax.eval_shape``: nothing allocated, no data read)
for Split CIFAR-100 at 224x224 (10 tasks of 10 classes, class-incremental, Adam), each leaf
placed by ``jaxcl.sharding``'s rules (``mesh.min_shard_bytes`` at its default), bytes
summed per device from every leaf's shard shape, as benchmarks/scale.py does for ResNet-50.

    python benchmarks/vit_state_bytes.py [--models vit_b16 vit_l16] [--methods finetune ewc packnet]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

JOB = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import jaxcl
    from jaxcl import config as C, data, methods, models, optim, sharding
    out = {}
    for name, model_name, method in json.loads(sys.argv[1]):
        c = C.override(jaxcl.get_config(f"split_cifar100:method={method}"),
                       [f"model.name={model_name}", "optimizer.name=adam", "num_tasks=10", "scenario=class"]
                       + (["method.task_norm=false"] if method == "packnet" else []))
        info = data.StreamInfo(10, "class", (224, 224, 3), 1, 100, (100,), (10,) * 10)
        m = methods.build(c, models.build(c.model, info), info)
        tx = optim.make(c.optimizer)

        def init(rng):
            s = m.init(rng, jnp.zeros((1, 224, 224, 3)))
            return s.replace(opt_state=tx.init(s.params))

        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        row = {"model": model_name, "method": method,
               "params": int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(abstract.params)))}
        for what, mesh in (("replicated", sharding.make_mesh(2, 1)), ("fsdp2", sharding.make_mesh(1, 2))):
            row[what] = sharding.bytes_per_device(
                abstract, sharding.state_shardings(abstract, mesh, min_bytes=c.mesh.min_shard_bytes))
        row["ratio_fsdp2_over_replicated"] = round(row["fsdp2"]["per_device_max"]
                                                   / row["replicated"]["per_device_max"], 4)
        row["mib_per_device"] = {k: round(row[k]["per_device_max"] / 2**20, 1) for k in ("replicated", "fsdp2")}
        print(json.dumps({"run": name, **row}), flush=True)
""")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_b16"])
    ap.add_argument("--methods", nargs="+", default=["finetune", "ewc", "packnet"])
    args = ap.parse_args(argv)
    jobs = [(f"{meth}_{m}", m, meth) for m in args.models for meth in args.methods]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", JOB, json.dumps(jobs)], cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
