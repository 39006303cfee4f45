"""The per-trial progress line, on in-memory studies with hand-made trials and a hand-driven clock."""

import io
from datetime import datetime, timedelta

import optuna
import pytest

from ranksearch.inspect.progress import TrialProgress, trial_ranks_text
from ranksearch.utils.steps import clock_text

MODULES = ["block1", "block2", "block3", "block4", "block5"]
DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
BASELINE_MACS = 1000


def params(ks: list[int]) -> dict[str, float]:
    return {f"rank_{m}": k / 32 for m, k in zip(MODULES, ks, strict=True)}


def add_trial(study, ks, values=None, seconds=1.0, state=COMPLETE, **user_attrs) -> optuna.trial.FrozenTrial:
    """Add a finished trial that ran ``seconds``; returns it as the study stored it (as a callback gets it)."""
    start = datetime(2025, 1, 1, 12)
    if values is not None:  # what a trial records beside its values
        user_attrs = {"macs": values[1], "macs_ratio": values[1] / BASELINE_MACS} | user_attrs
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=None, values=values, datetime_start=start,
        datetime_complete=start + timedelta(seconds=seconds), params=params(ks),
        distributions={name: DIST for name in params(ks)}, user_attrs=user_attrs, system_attrs={},
        intermediate_values={},
    ))  # fmt: skip
    return study.trials[-1]


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ranks_text_reads_k_of_32_per_module():
    assert trial_ranks_text(params([8, 8, 4, 2, 2]), MODULES) == "8/8/4/2/2 /32"
    assert trial_ranks_text(params([32, 1, 16, 3, 31]), MODULES) == "32/1/16/3/31 /32"
    assert trial_ranks_text({"rank_block1": 0.25}, MODULES[:2]) == "8/? /32"  # a trial that failed before drawing all


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (34.4, "0:34"), (185, "3:05"), (3729, "1:02:09")])
def test_clock_text(seconds, text):
    assert clock_text(seconds) == text


def test_one_line_per_trial_with_progress_eta_and_best_so_far_over_the_whole_study():
    study = optuna.create_study(directions=["maximize", "minimize"])
    add_trial(study, [1, 1, 1, 1, 1], [0.58, 90.0])  # t0, before the run: 9 % of the MACs
    add_trial(study, [6, 5, 4, 2, 2], [0.661, 240.0])  # t1, before the run: 24 %
    out, clock = io.StringIO(), Clock(100.0)
    progress = TrialProgress(total=4, modules=MODULES, costs=["macs"], out=out, clock=clock)

    clock.now = 134.0
    progress(study, add_trial(study, [8, 8, 4, 2, 2], [0.6595, 412.0], seconds=11.2))
    clock.now = 150.0
    failed = add_trial(study, [1, 1, 1, 1, 32], state=FAIL, seconds=2.0,
                       fail_reason="RuntimeError: CUDA out of memory\nTried to allocate 2 GiB")  # fmt: skip
    progress(study, failed)
    clock.now = 400.0
    progress(study, add_trial(study, [3, 2, 2, 1, 1], [0.70, 100.0], seconds=3.0))  # exactly 10 % still fits

    assert out.getvalue().splitlines() == [
        # 34 s for 1 trial, 3 to go: ETA 1:42; the best so far are the trials from before the run
        "[1/4] trial 2  ranks 8/8/4/2/2 /32  val 65.95%  MACs 0.412x  11.2 s | elapsed 0:34, ETA 1:42"
        " | best val at <=25% MACs: 66.1% (t1), at <=10%: 58.0% (t0)",
        "[2/4] trial 3  ranks 1/1/1/1/32 /32  FAIL: RuntimeError: CUDA out of memory  2.0 s | elapsed 0:50, ETA 0:50"
        " | best val at <=25% MACs: 66.1% (t1), at <=10%: 58.0% (t0)",
        "[3/4] trial 4  ranks 3/2/2/1/1 /32  val 70.00%  MACs 0.100x  3.0 s | elapsed 5:00, ETA 1:40"
        " | best val at <=25% MACs: 70.0% (t4), at <=10%: 70.0% (t4)",
    ]


def test_a_dash_when_no_trial_fits_a_budget():
    study = optuna.create_study(directions=["maximize", "minimize"])
    out = io.StringIO()
    progress = TrialProgress(total=1, modules=MODULES, costs=["macs"], out=out, clock=Clock(0.0))
    progress(study, add_trial(study, [32] * 5, [0.9, 1000.0]))
    assert out.getvalue().endswith(" | elapsed 0:00, ETA 0:00 | best val at <=25% MACs: -, at <=10%: -\n")


def test_as_an_optuna_callback_it_counts_only_the_trials_of_this_run():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    add_trial(study, [1, 1, 1, 1, 1], [0.5, 10.0])  # an earlier run's trial: the best at both budgets

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        ks = [round(trial.suggest_float(f"rank_{m}", 1 / 32, 1, step=1 / 32) * 32) for m in MODULES]
        if trial.number == 2:
            trial.set_user_attr("fail_reason", "ValueError: boom")
            raise ValueError("boom")
        return 0.4, float(sum(ks) * 100)  # never better than the earlier trial

    out = io.StringIO()
    progress = TrialProgress(total=3, modules=MODULES, costs=["macs"], out=out)
    study.optimize(objective, n_trials=3, callbacks=[progress], catch=(ValueError,))
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["[1/3] trial 1", "[2/3] trial 2", "[3/3] trial 3"]
    assert "  FAIL: ValueError: boom  " in lines[1] and "ETA 0:00 |" in lines[2]
    for trial, line in zip(study.trials[1:], lines, strict=True):
        assert f"ranks {trial_ranks_text(trial.params, MODULES)}  " in line
        assert line.endswith("| best val at <=25% MACs: 50.0% (t0), at <=10%: 50.0% (t0)")


def test_a_long_training_in_a_log_prints_a_line_every_30_seconds_and_at_the_end(capsys):
    """Pretraining printed nothing for 11 minutes off a terminal (and the refine a line per epoch only)."""
    import torch

    from ranksearch.utils.steps import StepLines

    now = [0.0]
    lines = StepLines("baseline: pretraining", total=100, clock=lambda: now[0])
    for step in range(100):
        now[0] += 1.0  # a second per step
        lines.update(1, torch.tensor(2.5 - step / 100))
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == 4  # at 30, 60 and 90 s, and the last step
    assert printed[0] == "baseline: pretraining: step 30/100, loss 2.2100, 1.00 steps/s, ETA 1:10"
    assert printed[-1].startswith("baseline: pretraining: step 100/100, loss 1.5100, ") and printed[-1].endswith(
        "ETA 0:00")  # fmt: skip


def test_a_bar_only_on_a_terminal_that_has_columns(monkeypatch):
    """A pseudo-terminal nobody sized (``script`` without a terminal, some containers) has 0 columns: tqdm drew
    nothing there, so pretraining was silent again; it gets the log's lines. A sized one gets the bar."""
    import fcntl
    import io
    import os
    import pty
    import struct
    import sys
    import termios

    from tqdm import tqdm

    from ranksearch.utils.steps import StepLines, draws_bars, step_progress

    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert terminal.isatty() and os.get_terminal_size(follower).columns == 0
        assert not draws_bars() and isinstance(step_progress("x", 10), StepLines)
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
        assert draws_bars()
        bar = step_progress("x", 10)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(leader)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log
    assert not draws_bars()
