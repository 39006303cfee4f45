"""Many workers on one study: shares, tags, re-runs; `run --workers N`, a worker killed with -9, SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from test_study import SMOKE, load

from conftest import REPO
from ranksearch.search.workers import Worker, _env, done_in_run, requeue_interrupted, shares, worker_threads
from ranksearch.study.attrs import INTERRUPTED, RETRY_OF

MODULES = ["block1", "block2", "block3", "block4", "block5"]
DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)
COMPLETE, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                           optuna.trial.TrialState.RUNNING)  # fmt: skip


def test_shares_split_the_asked_trials_evenly():
    assert shares(7, 3) == [3, 2, 2] and sum(shares(200, 8)) == 200
    assert shares(2, 4) == [1, 1]  # no worker without a trial


def test_several_workers_share_one_gpu_and_the_cores(monkeypatch):
    """`run --workers 4` on one GPU: all four on it, each with a quarter of the cores (one thread each had left the
    sampler's fit and the decomposition on one core while 15 idled); on 2 GPUs, worker i on GPU i mod 2."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_threads(4) == 4 and worker_threads(8) == 2 and worker_threads(32) == 1
    assert worker_threads(4, threads=3) == 3  # --threads 3
    team = [Worker("ab12cd34", i, 40, worker_threads(4)) for i in range(4)]
    assert [_env(w, gpus=1)["CUDA_VISIBLE_DEVICES"] for w in team] == ["0"] * 4
    assert {_env(w, gpus=1)["OMP_NUM_THREADS"] for w in team} == {"4"}
    assert [_env(w, gpus=2)["CUDA_VISIBLE_DEVICES"] for w in team] == ["0", "1", "0", "1"]


def test_a_worker_round_trips_through_its_flag():
    worker = Worker("ab12cd34", 2, 9, 1)
    assert Worker.parse(worker.text()) == worker


def hand_trial(state, rank, **attrs):
    values = [0.5, 100.0] if state == COMPLETE else None
    return optuna.trial.create_trial(
        state=state, params={"rank_block1": rank}, distributions={"rank_block1": DIST}, values=values,
        user_attrs=attrs,
    )  # fmt: skip


def test_done_counts_what_ended_by_itself_and_interrupted_trials_run_again():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(hand_trial(COMPLETE, 0.25, run_id="r1"))
    study.add_trial(hand_trial(FAIL, 0.5, run_id="r1", fail_reason="TrainingDiverged: loss became nan"))
    study.add_trial(hand_trial(FAIL, 0.75, run_id="r1", fail_reason=INTERRUPTED))
    study.add_trial(hand_trial(FAIL, 0.125, run_id="r1"))  # failed by the heartbeat: its worker died
    study.add_trial(hand_trial(COMPLETE, 0.25, run_id="r2"))
    assert [t.number for t in done_in_run(study.trials, "r1")] == [0, 1]
    assert requeue_interrupted(study) == [2]
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs[RETRY_OF]) for t in waiting] == [({"rank_block1": 0.75}, 2)]
    assert requeue_interrupted(study) == []  # once


def run_cli_async(cwd, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ranksearch", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def wait_for_running_trial(study_of, timeout=300.0) -> optuna.trial.FrozenTrial:
    """The first RUNNING trial that has drawn all its ranks and recorded its worker's pid (``study_of()`` loads
    it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = study_of().get_trials(states=(RUNNING,))
            running = [t for t in trials if "pid" in t.user_attrs and len(t.params) == len(MODULES)]
        except Exception:  # the run is creating the storage, its tables or the study: look again
            running = []
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("no trial started")


pytestmark_slow = pytest.mark.slow


@pytestmark_slow
def test_three_workers_share_the_asked_trials(workdir, tiny_imagefolder):
    process = run_cli_async(workdir, "run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "6",
                            "--workers", "3")  # fmt: skip
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    trials = load(workdir).trials
    assert [t.state for t in trials].count(COMPLETE) == 6 == len(trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1, 2} and len({t.user_attrs["run_id"] for t in trials}) == 1
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no rank vector trained twice
    assert all(f" w{i} trial " in out for i in range(3)) and "[6/6]" in out and "ETA" in out
    assert err.count("baseline: val ") == 1 and err.count("(cached)") == 1  # the parent's, not once per worker


@pytestmark_slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_retried(workdir, tiny_imagefolder, engine, request):
    storage = request.getfixturevalue("postgres_url") if engine == "postgresql" else None
    where = ("--storage", storage) if storage else ()
    study_of = (lambda: optuna.load_study(study_name="smoke", storage=storage)) if storage else (lambda: load(workdir))
    process = run_cli_async(workdir, "run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "6", *where,
                            "--workers", "3", "--heartbeat-seconds", "1", "--finetune-steps", "60")  # fmt: skip
    victim = wait_for_running_trial(study_of)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "a worker died" in err and "Traceback" not in err
    trials = study_of().trials
    assert [t.state for t in trials].count(COMPLETE) == 6
    killed = trials[victim.number]
    assert killed.state == FAIL
    retries = [t for t in trials if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == killed.number]
    # PostgreSQL locks the stale trial's row, so one worker fails and retries it; SQLite cannot, and two workers
    # may both retry it (the later one is then answered from the earlier one's result when that has finished).
    assert len(retries) == 1 or (engine == "sqlite" and len(retries) == 2)
    assert all(t.state == COMPLETE and t.params == killed.params for t in retries)
    assert len(list((workdir / "studies" / "baselines").glob("*[0-9a-f].pt"))) == 1  # one baseline


@pytestmark_slow
def test_sigterm_records_the_trial_as_interrupted_and_the_next_run_reruns_it(workdir, tiny_imagefolder):
    process = run_cli_async(workdir, "run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "3",
                            "--finetune-steps", "300")  # fmt: skip  (long enough that the signal lands mid-trial)
    victim = wait_for_running_trial(lambda: load(workdir))
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, (victim.number, out, err)
    stopped = load(workdir).trials[victim.number]
    assert stopped.state == FAIL and stopped.user_attrs["fail_reason"] == INTERRUPTED
    again = run_cli_async(workdir, "run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "1",
                          "--finetune-steps", "300")  # fmt: skip
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"re-running interrupted trial(s) {victim.number}" in out
    rerun = [t for t in load(workdir).trials if t.user_attrs.get(RETRY_OF) == victim.number]
    assert [(t.state, t.params) for t in rerun] == [(COMPLETE, stopped.params)]


@pytest.mark.parametrize("when", ["before its tell", "during its tell"])
def test_a_queued_trial_another_worker_took_at_the_same_instant_is_not_counted(capsys, monkeypatch, when):
    """SQLite's queue can hand one WAITING trial to two workers; the one that tells second goes on with the next,
    whether the other told before its tell began (Optuna: "Cannot tell a COMPLETE trial") or while it ran
    (UpdateFinishedTrialError: in CI this killed a sensitivity worker, and its share of the points went unmeasured)."""
    from ranksearch.search.workers import Worker, optimize_share

    study = optuna.create_study()
    for x in (1.0, 2.0, 3.0):
        study.enqueue_trial({"x": x})
    told = []
    storage, write_state = study._storage, study._storage.set_trial_state_values

    def other_worker_tells_during_the_write(trial_id, state, values=None):
        if state == COMPLETE and storage.get_trial(trial_id).params["x"] == 2.0:
            write_state(trial_id, COMPLETE, [0.0])
        return write_state(trial_id, state, values)

    def objective(trial):
        x = trial.suggest_float("x", 0, 10)
        if x == 2.0 and when == "before its tell":
            write_state(trial._trial_id, COMPLETE, [0.0])
        told.append(x)
        return x

    if when == "during its tell":
        monkeypatch.setattr(storage, "set_trial_state_values", other_worker_tells_during_the_write)

    optimize_share(study, objective, Worker("r", 0, 3), 3, callbacks=[])
    assert told[:3] == [1.0, 2.0, 3.0] and len(told) == 4  # the lost one is made up by a fourth trial
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4
    assert "run by another worker at the same moment" in capsys.readouterr().out


@pytest.mark.parametrize(("exits", "started"), [((1, 0), 3), ((0, 0), 3), ((2, 2), 2)])
def test_trials_still_owed_when_the_workers_ended_get_one_more_worker(monkeypatch, capsys, exits, started):
    """A worker that crashed with an error (exit 1), or trials left queued when both ended well (two workers told
    one queued trial, and it was counted twice), leave trials owed: one more worker runs them. A user's mistake
    (exit 2) is the same in every worker, so none is started for it."""
    from ranksearch.search import workers

    quotas = []

    def start(argv, worker, quota, gpus):
        quotas.append(quota)
        code = exits[len(quotas) - 1] if len(quotas) <= len(exits) else 0
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])

    monkeypatch.setattr(workers, "_start", start)
    owed = lambda: 0 if len(quotas) > len(exits) else 3  # noqa: E731 (the extra worker runs what is owed)
    workers.run_workers(["run"], Worker("r", 0, 4), 2, 0, owed, grace_seconds=0)
    assert len(quotas) == started
    assert quotas[:2] == [2, 2] and ("3 trial(s) still owed" in capsys.readouterr().err) == (started == 3)
    assert quotas[2:] == [3] * (started - 2)


def test_a_pruned_trial_is_done():
    """Budget mode prunes: a pruned trial ended by itself and counts toward the run's trials."""
    study = optuna.create_study(direction="maximize")
    for rank, run_id in ((0.25, "r1"), (0.5, "r2")):
        pruned, attrs = optuna.trial.TrialState.PRUNED, {"run_id": run_id}
        trial = optuna.trial.create_trial(state=pruned, params={"rank_block1": rank},
                                          distributions={"rank_block1": DIST}, user_attrs=attrs)  # fmt: skip
        study.add_trial(trial)
    assert [t.number for t in done_in_run(study.trials, "r1")] == [0]
