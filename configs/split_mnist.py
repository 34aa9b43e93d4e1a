"""Split-MNIST: MNIST's 10 digits in 5 tasks of 2 (0/1, 2/3, ...), task-incremental.
Hsu et al. (2018) setting: MLP 2x400, Adam lr 1e-3, batch 128, 4 epochs per task.

    jaxcl run split_mnist:method=ewc              # ~10 s on 2 CPU cores
    jaxcl run split_mnist:method=finetune --set scenario=class
    jaxcl run split_mnist:method=packnet          # ~15 s on 2 CPU cores
Needs mnist.npz in data.dir / $JAXCL_DATA_DIR, or TFDS's mnist.
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "split_mnist"
    c.num_tasks = 5
    c.epochs = 4
    c.batch_size = 128
    c.scenario = "task"
    c.data.name = "mnist"
    c.data.stream = "split"
    c.data.classes_per_task = 2
    c.model.name = "mlp"
    c.model.hidden = (400, 400)
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    return cfglib.finalize(c, arg, {
        "ewc": {"method.ewc_lambda": 5000.0},
        # () = equal shares for num_tasks: each task keeps 1/(tasks left) of what is free, the last the rest
        "packnet": {"method.prune": (), "method.retrain_epochs": 1},
    })
