"""Split-Digits, the embedded default: scikit-learn's 8x8 digits (1,797 real images, no
download) cut into 5 tasks of 2 classes, task-incremental, MLP 2x128.

    jaxcl run                                     # = split_digits, method ewc; ~10 s on 2 CPU cores
    jaxcl run split_digits:method=finetune --set scenario=class
"""
from jaxcl import config as cfglib


def get_config(arg=None):
    c = cfglib.base_config()
    c.benchmark = "split_digits"
    c.num_tasks = 5
    c.epochs = 10
    c.batch_size = 16
    c.scenario = "task"
    c.data.name = "digits"
    c.data.stream = "split"
    c.data.classes_per_task = 2
    c.model.name = "mlp"
    c.model.hidden = (128, 128)
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    c.method.name = "ewc"
    return cfglib.finalize(c, arg, {"ewc": {"method.ewc_lambda": 1000.0}})
