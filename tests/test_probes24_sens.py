"""Issue 24, sensitivity rows: a killed point is measured again (W6), two processes on one study count each point
once (W7), and no worker outlives its parent (H4)."""

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest

from conftest import REPO, SMOKE_CONFIG, run_cli

# 2 ladder ranks (16/32, 24/32) x 5 modules of the smoke VGG: 10 points of a fraction of a second each
TWO_RANKS = "rank_min: 0.5\nrank_max: 0.75\n"
ONE_RANK = "rank_min: 0.75\nrank_max: 0.75\n"


def _config(workdir: Path, name: str, extra: str) -> str:
    """The smoke config with the keys of ``extra`` (YAML lines) set to its values (a key set twice is refused)."""
    keys = {line.partition(":")[0] for line in extra.splitlines()}
    kept = [line for line in SMOKE_CONFIG.read_text().splitlines() if line.partition(":")[0] not in keys]
    path = workdir / name
    path.write_text("\n".join(kept) + "\n" + extra)
    return str(path)


def _points_study(workdir: Path, heartbeat: int | None = None) -> optuna.Study:
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{workdir}/studies/baselines/sensitivity.db",
                                               heartbeat_interval=heartbeat)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if "-sensitivity-" in s.study_name]
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=storage)


def _complete_by_point(study: optuna.Study) -> collections.Counter:
    return collections.Counter(
        (t.system_attrs["fixed_params"]["module"], t.system_attrs["fixed_params"]["rank"])
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    )


def _csv_points(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(",")[:2]) for line in path.read_text().splitlines()[1:]]


def _start(workdir: Path, *args: str, log: str) -> tuple[subprocess.Popen, Path]:
    """``python -m ranksearch ARGS`` in the background, stdout and stderr into ``workdir/log``."""
    out = workdir / log
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with out.open("w") as file:
        process = subprocess.Popen([sys.executable, "-m", "ranksearch", *args], cwd=workdir, env=env, stdout=file,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    return process, out


def _wait_for(condition, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {seconds} s")


@pytest.mark.slow
def test_a_killed_point_is_waited_for_then_measured_again_and_counted_once(workdir, tiny_imagefolder):
    """W6: a point whose worker died 'just now' stays RUNNING; a rerun at once waits for it while its heartbeat is
    fresh, then fails it and measures it again; every point ends with exactly one COMPLETE, and the CSV has them."""
    data = str(tiny_imagefolder)
    first = run_cli("sensitivity", "--config", _config(workdir, "one.yaml", ONE_RANK), "--data-dir", data, "--out",
                    "sens1", cwd=workdir)  # fmt: skip
    assert first.returncode == 0, first.stderr
    study = _points_study(workdir, heartbeat=1)
    study.enqueue_trial({"module": "block1", "rank": 0.5})
    with pytest.warns(UserWarning):  # Optuna: the heartbeat is meant for optimize()
        held = study.ask()  # a worker's point: RUNNING, its heartbeat beating while the worker lives
    alive = threading.Event()
    alive.set()

    def beat():
        while alive.is_set():
            study._storage.record_heartbeat(held._trial_id)
            time.sleep(0.2)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        config = _config(workdir, "two.yaml", TWO_RANKS)
        process, log = _start(workdir, "sensitivity", "--config", config, "--data-dir", data, "--out", "sens2",
                              "--heartbeat-seconds", "1", log="rerun.log")  # fmt: skip
        waits = "waiting for 1 point(s) another process is measuring (block1 16/32)"
        _wait_for(lambda: waits in log.read_text() or process.poll() is not None, 120, "wait or end")
        assert waits in log.read_text(), log.read_text()
        assert study._storage.get_trial(held._trial_id).state.name == "RUNNING"  # a live worker's point is not taken
    finally:
        alive.clear()  # the worker dies
        beating.join()
    assert process.wait(timeout=120) == 0, log.read_text()
    assert study._storage.get_trial(held._trial_id).state.name == "FAIL"
    complete = _complete_by_point(study)
    assert len(complete) == 10 and set(complete.values()) == {1}, complete
    assert len(_csv_points(workdir / "sens2" / "sensitivity.csv")) == 10
    assert "failed" not in log.read_text()


def test_a_point_that_failed_is_named_with_its_reason_no_allocations_then_a_rerun_measures_it(
    workdir, tiny_imagefolder, monkeypatch
):
    """W6: the failed count and its reason are true; allocations come from a complete set only (else exit
    non-zero); the next run measures the failed point again."""
    from ranksearch.search import sensitivity

    measure = sensitivity.trial_model

    def broken(model, ranks, *args, **kwargs):
        if "block2" in ranks:
            raise RuntimeError("boom")
        return measure(model, ranks, *args, **kwargs)

    config = _config(workdir, "one.yaml", ONE_RANK)
    args = ("sensitivity", "--config", config, "--data-dir", str(tiny_imagefolder), "--out", "sens")
    monkeypatch.setattr(sensitivity, "trial_model", broken)
    failed = run_cli(*args, cwd=workdir)
    assert failed.returncode == 2
    assert "1 of 5 sensitivity points are not measured (block2 24/32: failed: RuntimeError: boom)" in failed.stderr
    assert "allocations" not in failed.stdout and not (workdir / "sens" / "sensitivity.csv").exists()
    monkeypatch.setattr(sensitivity, "trial_model", measure)
    again = run_cli(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "measuring 1 of 5 points" in again.stdout and "allocations" in again.stdout
    assert len(_csv_points(workdir / "sens" / "sensitivity.csv")) == 5


def test_of_two_copies_of_a_point_started_together_one_yields():
    """W7: two processes that queued one point at the same instant each start a copy; the later-started copy
    yields to the earlier one (whichever checks first), and any copy yields to a measured one."""
    from ranksearch.search.sensitivity import counted_elsewhere

    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.enqueue_trial({"module": "block1", "rank": 0.5})
    first, second = study.ask(), study.ask()
    for trial in (first, second):
        trial.suggest_categorical("module", ["block1"]), trial.suggest_float("rank", 0.5, 0.5)
    assert counted_elsewhere(second, ("block1", 0.5)).number == first.number
    assert counted_elsewhere(first, ("block1", 0.5)) is None
    assert counted_elsewhere(first, ("block2", 0.5)) is None
    study.tell(first, 0.3)
    study.enqueue_trial({"module": "block1", "rank": 0.5})
    third = study.ask()
    assert counted_elsewhere(third, ("block1", 0.5)).number == first.number


@pytest.mark.slow
def test_two_sensitivity_processes_on_one_study_count_each_point_once(workdir, tiny_imagefolder):
    """W7: two processes started together share the points: one COMPLETE per point, both CSVs hold every point."""
    config = _config(workdir, "two.yaml", TWO_RANKS)
    started = [_start(workdir, "sensitivity", "--config", config, "--data-dir", str(tiny_imagefolder), "--out",
                      f"sens{i}", log=f"p{i}.log") for i in range(2)]  # fmt: skip
    for process, log in started:
        assert process.wait(timeout=300) == 0, log.read_text()
    complete = _complete_by_point(_points_study(workdir))
    assert len(complete) == 10 and set(complete.values()) == {1}, complete
    for i in range(2):
        assert sorted(_csv_points(workdir / f"sens{i}" / "sensitivity.csv")) == sorted(
            (m, f"{r}/32") for m in ("block1", "block2", "block3", "block4", "block5") for r in (16, 24)
        )


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(child) for child in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_no_sensitivity_worker_outlives_its_parent(signum, workdir, tiny_imagefolder):
    """H4: SIGTERM to the parent of `sensitivity --workers 2` reaches both workers (each records its point as
    interrupted); kill -9 of the parent too (the kernel tells them, on Linux). Nothing is left RUNNING."""
    config = _config(workdir, "slow.yaml", TWO_RANKS + "finetune_steps: 400\n")  # seconds per point
    process, log = _start(workdir, "sensitivity", "--config", config, "--data-dir", str(tiny_imagefolder),
                          "--workers", "2", "--out", "sens", log="parent.log")  # fmt: skip
    workers: set[int] = set()
    try:
        workers |= _wait_for(lambda: len(_children(process.pid)) == 2 and _children(process.pid), 120, "2 workers")
        _wait_for(lambda: "sensitivity: measuring" in log.read_text() and any(
            t.state.name == "RUNNING" for t in _points_study(workdir).get_trials()), 120, "point running")  # fmt: skip
        process.send_signal(signum)
        process.wait(timeout=60)
        _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, "end of the workers")
    finally:
        for pid in {process.pid, *workers, *_children(process.pid)}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    if signum == signal.SIGTERM:
        assert process.returncode == 130 and "interrupted" in log.read_text(), log.read_text()
    trials = _points_study(workdir).get_trials()
    assert not [t.number for t in trials if t.state.name == "RUNNING"]
    assert any(t.user_attrs.get("fail_reason") == "interrupted" for t in trials)


def test_a_trial_that_is_no_queued_point_is_pruned_before_it_measures():
    """W7 (seen on the merged code): when another process took the last queued point between this one's check and
    its ask, the sampler drew a trial with an arbitrary module and rank (off the ladder), which was measured and
    counted as a point."""
    from ranksearch.search.sensitivity import PointObjective

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"module": "block1", "rank": 0.5})
    objective = PointObjective.__new__(PointObjective)  # nothing it holds is reached before the check
    objective.config = objective.table = None
    queued = study.ask()
    drawn = study.ask()
    with pytest.raises(optuna.TrialPruned, match="no queued point"):
        objective._measure(drawn)
    with pytest.raises(AttributeError):  # a queued point goes on to measure (and here finds no table)
        objective._measure(queued)
