import pytest

import jaxcl
from jaxcl import config as config_lib
from jaxcl.config import ConfigError


@pytest.mark.parametrize("name", jaxcl.list_benchmarks())
def test_every_benchmark_config_has_the_required_keys(name):
    c = jaxcl.get_config(name)
    for key in ("seed", "num_tasks", "epochs", "batch_size", "data.dir", "method.name"):
        config_lib._lookup(c, key)  # raises ConfigError when missing
    config_lib.validate(c)
    assert c.benchmark == name
    doc = __import__(f"jaxcl.configs.{name}", fromlist=["x"]).__doc__
    assert "jaxcl run" in doc and ("min" in doc or " s " in doc), "docstring gives command and run time"


def test_method_arg_brings_the_method_defaults_and_benchmark_overrides():
    c = jaxcl.get_config("permuted_mnist:method=ewc")
    assert c.method.name == "ewc" and c.method.ewc_lambda == 1.0 and c.method.fisher == "batch"
    f = jaxcl.get_config("permuted_mnist:method=finetune")
    assert "ewc_lambda" not in f.method


def test_unknown_key_is_refused_by_name_with_a_suggestion():
    c = jaxcl.get_config("split_digits:method=ewc")
    with pytest.raises(ConfigError, match=r"unknown config key 'method.ewc_lamda'; did you mean 'method.ewc_lambda'"):
        config_lib.override(c, ["method.ewc_lamda=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nosuch.key'"):
        config_lib.override(c, ["nosuch.key=1"])


def test_bad_values_are_refused_by_name():
    c = jaxcl.get_config()
    with pytest.raises(ConfigError, match="epochs: expected a value of type int"):
        config_lib.override(c, ["epochs=1.5"])
    with pytest.raises(ConfigError, match="scenario: 'clas' is not one of task, class, domain"):
        config_lib.validate(config_lib.override(c, ["scenario=clas"]))
    with pytest.raises(ConfigError, match="method.name: unknown method 'nope'"):
        config_lib.override(c, ["method.name=nope"])
    with pytest.raises(ConfigError, match="model.name: unknown model 'vgg99'"):
        config_lib.validate(config_lib.override(c, ["model.name=vgg99"]))
    with pytest.raises(ConfigError, match="expected true or false"):
        config_lib.override(c, ["online=maybe"])
    with pytest.raises(ConfigError, match="unknown benchmark 'split_mnits'"):
        jaxcl.get_config("split_mnits")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        jaxcl.get_config("split_mnist:ewc")
    with pytest.raises(ConfigError, match="log.profile_steps: must be an integer >= 0, got -1"):
        config_lib.validate(config_lib.override(c, ["log.profile_steps=-1"]))


def test_override_parses_types_and_switches_method():
    c = config_lib.override(jaxcl.get_config(), ["optimizer.lr=1", "model.hidden=(64, 32)", "log.progress=false",
                                                 "method.name=ewc", "method.ewc_lambda=5", "data.datasets=mnist,cifar10"])
    assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)
    assert c.model.hidden == (64, 32)
    assert c.log.progress is False
    assert c.method.name == "ewc" and c.method.ewc_lambda == 5.0
    assert c.data.datasets == ("mnist", "cifar10")


def test_config_from_a_file_path(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("from jaxcl import config as c\n"
                 "def get_config(arg=None):\n"
                 "    x = c.base_config(); x.benchmark = 'mine'; x.num_tasks = 3\n"
                 "    return c.finalize(x, arg)\n")
    c = jaxcl.get_config(f"{f}:method=joint")
    assert c.benchmark == "mine" and c.num_tasks == 3 and c.method.name == "joint"


def test_fingerprint_ignores_logging_but_not_hyperparameters():
    a = jaxcl.get_config()
    b = config_lib.override(a, ["log.every_steps=7", "checkpoint.every_steps=3", "mesh.data=1"])
    assert config_lib.fingerprint(a) == config_lib.fingerprint(b)
    c = config_lib.override(a, ["optimizer.lr=0.5"])
    assert config_lib.fingerprint(a) != config_lib.fingerprint(c)
