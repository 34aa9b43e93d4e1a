"""Multi-dataset sequence: MNIST -> Fashion-MNIST -> CIFAR-10, one dataset per task, all
brought to 32x32x3 (greyscale zero-padded and repeated), task-incremental, small CNN,
SGD lr 0.01 momentum 0.9, batch 64, 2 epochs.

    jaxcl run multi_dataset:method=ewc            # ~13 min on 2 CPU cores
Needs mnist.npz, fashion_mnist.npz and cifar10.npz in data.dir / $JAXCL_DATA_DIR (or TFDS).
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "multi_dataset"
    c.num_tasks = 3
    c.epochs = 2
    c.batch_size = 64
    c.scenario = "task"
    c.data.stream = "multi"
    c.data.datasets = ("mnist", "fashion_mnist", "cifar10")
    c.model.name = "cnn"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 100.0}})
