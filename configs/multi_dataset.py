"""Multi-dataset sequence: MNIST -> Fashion-MNIST -> CIFAR-10, one dataset per task, all
brought to 32x32x3 (greyscale zero-padded and repeated), task-incremental, small CNN,
SGD lr 0.01 momentum 0.9, batch 64, 2 epochs.

    jaxcl run multi_dataset:method=ewc            # ~13 min on 2 CPU cores
Needs mnist.npz, fashion_mnist.npz and cifar10.npz in data.dir / $JAXCL_DATA_DIR (or TFDS).

``method=clr`` reprograms a backbone pretrained on CIFAR-10 for a stream without
CIFAR-10: MNIST and Fashion-MNIST (brought to 32x32x3), each split into two tasks of 5
classes (4 tasks), reduced ResNet-18, the reference's optimiser (Adam lr 1e-3, x0.1 every
third of the epochs, L2-norm penalty 1e-5), 6 epochs of 5,000 images per task:

    jaxcl run pretrain --workdir runs/pretrain-c10                      # the backbone
    jaxcl run multi_dataset:method=clr --set model.pretrained=runs/pretrain-c10   # ~6 min
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
    c.data.classes_per_task = 0  # one task per dataset
    c.model.name = "cnn"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    reprogramming = {
        "num_tasks": 4, "data.datasets": ("mnist", "fashion_mnist"), "data.classes_per_task": 5,
        "data.image_shape": (32, 32, 3),  # the CIFAR-10 backbone's input
        "data.train_limit": 5000, "epochs": 6, "batch_size": 32, "model.name": "reduced_resnet18",
        "optimizer.name": "adam", "optimizer.lr": 1e-3, "optimizer.momentum": 0.0, "optimizer.schedule": "step",
        "optimizer.milestones": (2, 4), "optimizer.gamma": 0.1, "method.l2": 1e-5,
    }
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 100.0}, "clr": reprogramming})
