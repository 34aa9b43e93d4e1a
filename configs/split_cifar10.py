"""Split-CIFAR-10: 5 tasks of 2 classes, task-incremental, the reduced ResNet-18 of
GEM/La-MAML/NCCL (width 20), SGD lr 0.03 momentum 0.9, batch 32, 5 epochs, random crop
and flip.

    jaxcl run split_cifar10:method=ewc            # ~25 min on 2 CPU cores; minutes on a GPU
Needs cifar10.npz in data.dir / $JAXCL_DATA_DIR, or TFDS's cifar10.
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "split_cifar10"
    c.num_tasks = 5
    c.epochs = 5
    c.batch_size = 32
    c.eval_batch_size = 500
    c.scenario = "task"
    c.data.name = "cifar10"
    c.data.stream = "split"
    c.data.classes_per_task = 2
    c.data.augment = True
    c.model.name = "reduced_resnet18"
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.03
    c.optimizer.momentum = 0.9
    # clr: the reference's optimiser (Adam 1e-3, x0.1 every third of the epochs); pass a
    # backbone pretrained elsewhere with --set model.pretrained=WORKDIR
    clr = {"optimizer.name": "adam", "optimizer.lr": 1e-3, "optimizer.momentum": 0.0, "optimizer.schedule": "step",
           "optimizer.milestones": (2, 4), "epochs": 6, "method.l2": 1e-5}
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 100.0}, "clr": clr})
