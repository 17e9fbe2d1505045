"""The prefetching loop trains on exactly the batches of the loop that builds each batch in
place: identical metrics, step for step."""

from conftest import TINY_SHAPE, corpus

from jaxlm.cli import main
from jaxlm.train import rundir

STEPS = 12


def _train(tmp, prefetch: int):
    run = tmp / f"prefetch{prefetch}"
    code = main(["train", f"run.dir={run}", f"data.files={corpus(tmp)}", *TINY_SHAPE,
                 f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
                 "train.eval_batches=1", "checkpoint.every=5", "run.quiet=true",
                 f"train.prefetch={prefetch}"])
    assert code == 0
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rundir.read_metrics(run)
            if "loss" in r and "event" not in r]


def test_prefetch_changes_nothing_but_speed(tmp_path):
    built_in_place = _train(tmp_path, 0)
    prefetched = _train(tmp_path, 2)
    assert [s for s, _, _ in prefetched] == list(range(1, STEPS + 1))
    assert prefetched == built_in_place  # bit-identical losses and gradient norms
