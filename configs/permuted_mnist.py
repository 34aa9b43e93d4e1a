"""Permuted-MNIST: 10 tasks, each MNIST under its own fixed pixel permutation (the first
included), domain-incremental (one 10-way head). The ContinualAI continual-learning-
baselines EWC setting: MLP 784-512-10, SGD lr 1e-3, batch 256, 10 epochs, lambda 1;
their target ACC is 0.83.

    jaxcl run permuted_mnist:method=ewc           # ~1 min on 2 CPU cores (ACC 0.841)
    jaxcl run permuted_mnist:method=packnet       # ~1 min on 2 CPU cores (ACC 0.969, BWT 0)
Needs mnist.npz in data.dir / $JAXCL_DATA_DIR, or TFDS's mnist.
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "permuted_mnist"
    c.num_tasks = 10
    c.epochs = 10
    c.batch_size = 256
    c.scenario = "domain"
    c.data.name = "mnist"
    c.data.stream = "permuted"
    c.model.name = "mlp"
    c.model.hidden = (512,)
    c.optimizer.name = "sgd"
    c.optimizer.lr = 1e-3
    c.method.name = "ewc"
    return cfglib.finalize(c, arg, {
        "ewc": {"method.ewc_lambda": 1.0},
        # equal shares of the trunk (each task keeps 1/(tasks left) of what is free) and SGD
        # with momentum: freed weights restart from zero, which SGD at 1e-3 is too slow for
        "packnet": {"method.prune": (),  # () = equal shares for num_tasks tasks
                    "method.retrain_epochs": 2, "optimizer.lr": 0.01, "optimizer.momentum": 0.9},
    })
