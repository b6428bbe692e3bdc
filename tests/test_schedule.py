"""α schedules: their curves, per-site α, the saved position and the command line's spelling."""

from __future__ import annotations

import math

import pytest
import torch

import meansparse as ms
from meansparse.placement import AlphaSchedule, parse_alpha_schedule


def test_curves_start_at_zero_and_hold_the_maximum():
    lin, cos, const = (AlphaSchedule(k, 0.4, steps=10) for k in ("linear", "cosine", "constant"))
    assert [lin.alpha(t) for t in (0, 5, 10, 50)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert cos.alpha(0) == 0.0 and cos.alpha(5) == pytest.approx(0.2) and cos.alpha(10) == pytest.approx(0.4)
    assert cos.alpha(2) == pytest.approx(0.4 * (1 - math.cos(math.pi * 0.2)) / 2) and cos.alpha(2) < lin.alpha(2)
    assert all(const.alpha(t) == 0.4 for t in (0, 3, 99))


def test_step_apply_and_per_site_alpha():
    model = ms.prepare(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2),
                                           torch.nn.ReLU()))
    names = [s.name for s in ms.sites(model)]
    sched = AlphaSchedule("linear", {names[0]: 0.2, names[1]: 0.6}, steps=4)
    sched.step()
    sched.apply(model)
    assert [o.alpha_value for o in ms.operators(model)] == pytest.approx([0.05, 0.15])


def test_state_dict_resumes_the_position_and_refuses_another_schedule():
    a = AlphaSchedule("cosine", 0.3, steps=7)
    for _ in range(3):
        a.step()
    b = AlphaSchedule("cosine", 0.3, steps=7)
    b.load_state_dict(a.state_dict())
    assert b.position == 3 and b.alpha() == a.alpha()
    with pytest.raises(ValueError, match="steps"):
        AlphaSchedule("cosine", 0.3, steps=8).load_state_dict(a.state_dict())


@pytest.mark.parametrize("kind, alpha, steps, match", [("step", 0.1, 3, "unknown"), ("linear", -1, 3, "alpha"),
                                                       ("linear", 0.1, 0, "steps")])
def test_bad_schedules_are_refused(kind, alpha, steps, match):
    with pytest.raises(ValueError, match=match):
        AlphaSchedule(kind, alpha, steps)


def test_command_line_spelling():
    assert parse_alpha_schedule("constant") == ("constant", 0.0)
    assert parse_alpha_schedule("linear:5") == ("linear", 5.0) and parse_alpha_schedule("cosine:0.5") == ("cosine", 0.5)
    for bad in ("linear", "linear:0", "linear:x", "constant:3", "exp:3"):
        with pytest.raises(ValueError, match="schedule"):
            parse_alpha_schedule(bad)
