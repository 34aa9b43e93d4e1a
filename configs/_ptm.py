"""What the pretrained-model configs (ptm_cifar100, ptm_imagenet_r) share: their
``runlocal=1`` size, a CPU smoke test of each method's settings."""


def runlocal(c, per_method: dict) -> dict:
    """Shrink ``c`` to ``vit_cifar`` at 32x32, 64 images a task, one epoch of batch 16, and
    return ``per_method`` with each method's pool and layers fitted to that 4-block ViT."""
    c.data.image_size = 32
    c.data.train_limit = c.data.test_limit = 64
    c.data.allow_missing_classes = True  # 64 images cannot hold every class of a task
    c.model.name = "vit_cifar"
    c.epochs = 1
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log.every_steps = 1
    small = {"epochs": 1, "batch_size": 16}
    return {"l2p": {**per_method["l2p"], **small, "method.length": 2, "method.top_k": 2},
            "dualprompt": {**per_method["dualprompt"], **small, "method.e_layers": (2, 3)},
            "coda_prompt": {**per_method["coda_prompt"], **small, "method.pool_size": 20, "method.layers": (0, 1, 2)},
            "simplecil": {}, "ranpac": {"method.projection": 256}}
