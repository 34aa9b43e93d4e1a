import numpy as np
import pytest

from jaxcl import metrics

# R[i][j]: accuracy on task j after training task i (3 tasks), b: before training.
R = [[0.9, 0.2, 0.1],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
b = [0.1, 0.25, 0.15]


def test_acc_is_the_mean_of_the_last_row():
    assert metrics.acc(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_bwt_by_hand():
    # (R[2,0]-R[0,0] + R[2,1]-R[1,1]) / 2 = (-0.4 - 0.1) / 2
    assert metrics.bwt(R) == pytest.approx(-0.25)


def test_fwt_by_hand():
    # (R[0,1]-b1 + R[1,2]-b2) / 2 = (0.2-0.25 + 0.3-0.15) / 2
    assert metrics.fwt(R, b) == pytest.approx(0.05)


def test_forgetting_by_hand():
    # task 0: max(0.9, 0.6) - 0.5 = 0.4 ; task 1: max(0.2, 0.8) - 0.7 = 0.1
    assert metrics.forgetting(R) == pytest.approx(0.25)


def test_forgetting_uses_the_best_earlier_row_not_the_diagonal():
    R2 = [[0.5, 0.1], [0.9, 0.6]]
    R3 = np.array([[0.5, 0.1, 0.1], [0.9, 0.6, 0.1], [0.4, 0.6, 0.9]])
    assert metrics.forgetting(R3) == pytest.approx(((0.9 - 0.4) + (0.6 - 0.6)) / 2)
    assert metrics.bwt(R3) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.6)) / 2)
    assert metrics.forgetting(R2) == pytest.approx(0.5 - 0.9)  # one task: max over row 0 only


def test_single_task_and_partial_matrices():
    assert metrics.summary([[0.7, 0.1]], [0.1, 0.1]) == {"acc": pytest.approx(0.4), "bwt": 0.0, "fwt": 0.0,
                                                        "forgetting": 0.0}
    with pytest.raises(ValueError, match="accuracy matrix"):
        metrics.acc([[0.1], [0.2]])


def test_param_counts_split_backbone_heads_and_stacked_extras():
    params = {"params": {"fc1": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)},
                         "head": {"kernel": np.zeros((5, 3, 2)), "bias": np.zeros((5, 2))}},
              "clr": {"k": np.zeros((5, 3, 3, 7))}}
    c = metrics.param_counts(params, num_tasks=5, num_heads=5)
    assert c["backbone"] == 15 and c["head_per_task"] == 8 and c["heads_total"] == 40
    assert c["extra_per_task"] == {"clr": 63} and c["total"] == 15 + 40 + 315
