"""After a NaN the message advises only a checkpoint that can work (finite parameters,
written while the loss was in range) or says plainly that none can."""
from __future__ import annotations

import pytest

from jaxcl import train


def test_no_checkpoint_is_advised_when_every_kept_one_was_written_after_the_loss_blew_up(make_config, tmp_path):
    c = make_config("split_digits:method=finetune", epochs=3, num_tasks=1, optimizer__lr=200.0,
                    checkpoint__every_steps=2, checkpoint__keep=5)
    with pytest.raises(train.NonFiniteLossError) as e:
        train.run(c, tmp_path, echo=lambda s: None)
    msg = str(e.value)
    assert "no kept checkpoint can be resumed from" in msg and "--resume" not in msg.split("):")[-1], msg
    assert "start again in a new --workdir with a lower optimizer.lr" in msg


def test_the_advised_checkpoint_is_one_that_can_be_resumed(make_config, tmp_path):
    # a calm first epoch (18 steps, saved every 2), then the lr jumps 20000x and the
    # checkpoints of the second epoch hold a blown-up state until the loss is NaN
    sets = dict(epochs=2, num_tasks=1, optimizer__schedule="step",
                optimizer__milestones="(1,)", checkpoint__every_steps=2, checkpoint__keep=10)
    with pytest.raises(train.NonFiniteLossError) as e:
        train.run(make_config("split_digits:method=finetune", optimizer__gamma=20000.0, **sets), tmp_path,
                  echo=lambda s: None)
    msg = str(e.value)
    assert "holds finite parameters written while the loss was in range (task 0, phase 0, epoch 0, batch 18); the newer ones cannot" \
        in msg, msg
    advised = int(msg.split("--resume-from ")[1].split()[0])
    r = train.run(make_config("split_digits:method=finetune", optimizer__gamma=1.0, **sets), tmp_path,
                  resume_from=advised, allow_change=("optimizer.gamma",), echo=lambda s: None)
    assert r["acc"] > 0.5  # the advice works
