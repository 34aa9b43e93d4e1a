"""W1 (../shared/peers/WORKLOADS.md): PackNet, MLP 784-400-400, batch 128. jaxcl, then the
PyTorch/Avalanche peer, side by side; one JSON line.

    python benchmarks/w1_packnet_mlp.py [--no-peer] [--devices N]
"""
import sys

import devices  # noqa: F401  (--devices N, before jax starts)
from packnet_workload import W1, main

if __name__ == "__main__":
    sys.exit(main(W1))
