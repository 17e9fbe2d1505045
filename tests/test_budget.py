"""train.time_budget's planning arithmetic (jaxlm.train.budget): the planned step count is
the most that fits, and the evaluations and saves it counts are those the hooks run; a wsd
run's re-planning from the loop's own pace."""

import pytest

from jaxlm import config as config_lib
from jaxlm.optim import decay_start
from jaxlm.train import budget, hooks
from jaxlm.train.budget import Costs, plan_steps, predicted_seconds

COSTS = Costs(setup=7.5, compile=2.0, step=0.05, eval=1.5, save=0.4, sample=0.7)


def _limit(seconds: float) -> float:
    return seconds * (1 - budget.RESERVE_SHARE) - budget.RESERVE_SECONDS


@pytest.mark.parametrize("seconds, eval_every, save_every", [
    (60, 100, 250), (60, 0, 1000), (300, 37, 11), (20, 5, 5)])
def test_plan_is_the_most_steps_that_fit(seconds, eval_every, save_every):
    n = plan_steps(COSTS, seconds, 10**6, eval_every, save_every)
    assert n > 0
    assert predicted_seconds(n, COSTS, eval_every, save_every) <= _limit(seconds)
    assert predicted_seconds(n + 1, COSTS, eval_every, save_every) > _limit(seconds)
    # By hand for the first case: 56.2 s are left after the reserve. 700 steps take 8.2 s of
    # fixed costs, 35 s of steps, 7 evaluations (10.5 s) and 3 saves (1.2 s): 54.9 s. A 701st
    # step brings an 8th evaluation: 56.45 s.
    if (seconds, eval_every, save_every) == (60, 100, 250):
        assert n == 700


def test_plan_stops_at_train_steps_and_is_0_when_nothing_fits():
    assert plan_steps(COSTS, 1e6, 1234, 100, 100) == 1234
    assert plan_steps(COSTS, 8.0, 1000, 100, 100) == 0  # the fixed costs alone: 8.2 s
    assert plan_steps(Costs(0, 0, 1.0, 0, 0, 0), 100.0, 10**9, 0, 10**9) == int(_limit(100))


def _hook_runs(hook: hooks.Hook, steps: int) -> int:
    p = hooks.Progress(step=0, total=steps, position=0, state=None)
    runs = 0
    for s in range(1, steps + 1):
        p.step = s
        runs += hook.due(p)
    return runs


@pytest.mark.parametrize("steps, every", [(100, 10), (101, 10), (7, 10), (30, 0), (1, 1)])
def test_counted_evaluations_and_saves_are_the_hooks(steps, every):
    cfg = config_lib.load(None, [f"train.eval_every={every}"])
    evaluate = hooks.Evaluate(cfg, lambda params: {}, None, None, None, None)
    assert budget.times_due(steps, every) == _hook_runs(evaluate, steps)
    if every > 0:
        save = hooks.Checkpoint(config_lib.load(None, [f"checkpoint.every={every}"]), None,
                                None)
        assert budget.times_due(steps, every) == _hook_runs(save, steps)


# ------------------------------------------------------------------ re-planning (wsd)

def _replan(eval_every: int = 100, save_every: int = 40, warmup: int = 10) -> budget.Replan:
    cfg = config_lib.load(None, ["optim.schedule=wsd", f"optim.warmup_steps={warmup}",
                                 f"train.eval_every={eval_every}",
                                 f"checkpoint.every={save_every}"])
    plan = budget.Plan(1000, 10**6, 300.0, COSTS, 0.0)
    return budget.Replan(plan, cfg, None, None, None, t_start=1000.0)


def test_replan_costs_predict_time_spent_plus_what_is_left():
    """From the loop's clock: the pace is the wall time since the origin less the
    evaluations and saves run in it, per step; a run of N steps is predicted to take the
    time spent so far plus N - step steps at that pace and the hooks still due."""
    r = _replan()
    r.origin = (50, 1010.0)  # step 50 at 10 s into the run
    step, now = 250, 1050.0
    hooks_run = 2 * COSTS.eval + 5 * COSTS.save  # evaluations at 100, 200; saves 80 ... 240
    pace = (now - 1010.0 - hooks_run) / 200
    costs = r.costs(step, now)
    assert costs.step == pytest.approx(pace)
    for n in (251, 400, 1000, 1001):
        left = ((n - step) * pace + (budget.times_due(n, 100) - 2) * COSTS.eval
                + (budget.times_due(n, 40) - 6) * COSTS.save + COSTS.sample)
        assert predicted_seconds(n, costs, 100, 40) == pytest.approx(now - 1000.0 + left)


def test_replan_keeps_the_lr_so_far_and_the_whole_warmup():
    """The fewest steps allowed at a step: decay_start (the last count at the peak) at least
    that step, and more steps than the warmup (whose length a shorter run would change)."""
    r = _replan(warmup=10)
    for step in (3, 50, 400):
        n = r.shortest_from(step)
        assert decay_start(r.cfg.optim, n) >= step and n > 10
        assert n == 11 or decay_start(r.cfg.optim, n - 1) < step
    assert r.shortest_from(400) == 499  # 20% decays: 499 - floor(99.8) = 400


def test_replan_ignores_changes_worth_less_than_a_second(monkeypatch):
    """The jitter of the pace moves the planned count by a few steps at every log step; only
    a change that moves the predicted end by REPLAN_SECONDS or more is made."""
    r, made = _replan(eval_every=0, save_every=10**6), []
    r.origin = (100, 1000.0)
    monkeypatch.setattr(r, "replan", lambda p, steps, costs: made.append(steps))
    p = hooks.Progress(step=200, total=5780, position=200, state=None)
    for pace in (0.05, 0.0501, 0.06):  # 5,780 steps fit, 5,768 (0.6 s less), 4,816
        monkeypatch.setattr(r, "costs", lambda step, now, pace=pace: Costs(
            setup=0.0, compile=0.0, step=pace, eval=0.0, save=0.0, sample=0.0))
        r.run(p)
    want = plan_steps(Costs(0, 0, 0.06, 0, 0, 0), 300.0, 10**6, 0, 10**6)
    assert made == [want] == [4816]
