"""W2 (../shared/peers/WORKLOADS.md): PackNet, reduced ResNet-18 (nf 20), batch 32, batch
norm frozen on task 2. jaxcl, then the PyTorch peer, side by side; one JSON line.

    python benchmarks/w2_packnet_resnet.py [--no-peer] [--devices N]
"""
import sys

import devices  # noqa: F401  (--devices N, before jax starts)
from packnet_workload import W2, main

if __name__ == "__main__":
    sys.exit(main(W2))
