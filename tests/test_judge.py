"""Judging candidates: only a candidate inside the threat model that the plain model misclassifies breaks
its example."""

from __future__ import annotations

import torch
from torch import nn

from meansparse.evaluation.judge import judge


class AlwaysClassZero(nn.Module):
    def forward(self, x):
        return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)


def test_judge_rejects_candidates_outside_the_threat_model():
    x = torch.full((5, 1, 2, 2), 0.5)
    y = torch.tensor([1, 1, 1, 1, 0])  # the model is wrong on the first four, right on the last
    x_adv = x.clone()
    x_adv[1, 0, 0, 0] += 0.2  # outside the Linf ball of 0.1
    x_adv[2, 0, 0, 0] = float("nan")
    x_adv[3] = 0.55  # inside the ball
    robust, invalid = judge(AlwaysClassZero(), x, x_adv, y, "Linf", 0.1)
    assert robust.tolist() == [False, True, True, False, True]
    assert invalid.tolist() == [False, True, True, False, False]

    near_one = torch.full((1, 1, 2, 2), 0.95)
    over = near_one.clone()
    over[0, 0, 0, 0] = 1.01  # within eps of x but outside [0, 1]
    assert judge(AlwaysClassZero(), near_one, over, torch.tensor([1]), "Linf", 0.1).invalid.tolist() == [True]
    # L2: the ball is eps in Euclidean norm
    l2 = x[:1] + torch.tensor([0.05, 0.05, 0.05, 0.05]).view(1, 1, 2, 2)  # norm 0.1
    assert judge(AlwaysClassZero(), x[:1], l2, y[:1], "L2", 0.1).robust.tolist() == [False]
    assert judge(AlwaysClassZero(), x[:1], l2, y[:1], "L2", 0.09).invalid.tolist() == [True]
