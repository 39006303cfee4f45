"""Many processes, one study: opening a fresh storage and joining a study are race-free on SQLite and on a real
PostgreSQL server, and two `run`s started together share one baseline, pretrained once."""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from conftest import REPO, SMOKE_CONFIG, _free_port
from ranksearch.data.datasets import CACHE_NAME
from ranksearch.study.storage import open_storage
from ranksearch.utils.errors import UserError

# Each process opens the storage and joins the study "race" as `run` does, once every process is ready.
JOIN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ranksearch.study.config import Config
    from ranksearch.study.storage import create_or_load

    url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    study = create_or_load(Config(storage=url, study_name="race", heartbeat_seconds=5))
    study.set_user_attr("joined", True)
    print(study.study_name)
""")


def start_together(count: int, make_command, cwd: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """``count`` processes that each touch ``ready/<i>`` once imported, then wait for ``go`` (made when all are
    ready), so that they reach the racy part at the same instant."""
    (cwd / "ready").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    processes = [
        subprocess.Popen(make_command(cwd / "ready" / str(i), cwd / "go"), cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        for i in range(count)
    ]
    deadline = time.monotonic() + 120
    while len(list((cwd / "ready").iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    (cwd / "go").touch()
    return processes


def join_together(url: str, cwd: Path, count: int = 4) -> None:
    processes = start_together(count, lambda ready, go: [sys.executable, "-c", JOIN, url, str(ready), str(go)], cwd)
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    for code, out, err in results:
        assert code == 0 and out.strip() == "race", err
    study = optuna.load_study(study_name="race", storage=url)
    assert study.user_attrs == {"joined": True}
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["race"]


def test_four_processes_join_one_fresh_postgres_database_at_once(postgres_url, tmp_path):
    """Creating Optuna's tables from 4 processes at once (once `UniqueViolation ... pg_type_typname_nsp_index`)."""
    join_together(postgres_url, tmp_path)


def test_four_processes_join_one_fresh_sqlite_file_at_once(tmp_path):
    join_together(f"sqlite:///{tmp_path / 'race.db'}", tmp_path)


def test_the_heartbeat_is_on_only_when_asked(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    assert open_storage(url).get_heartbeat_interval() is None  # read-only commands
    storage = open_storage(url, heartbeat_seconds=7)
    assert storage.get_heartbeat_interval() == 7 and storage.grace_period == 14
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback)
    assert isinstance(storage.retry, retry)  # called by the storage's own callback, which records fail_reason first
    assert storage.heartbeat_stale_trial_callback == storage.failed_stale


def test_a_missing_postgres_driver_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the [postgres] extra were not installed
    with pytest.raises(UserError) as error:
        open_storage("postgresql+psycopg://someone@127.0.0.1:1/ranksearch")
    message = str(error.value)
    assert "\n" not in message and "pip install 'ranksearch[postgres]'" in message


def test_an_unreachable_postgres_server_is_one_line_and_quick():
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        open_storage(f"postgresql+psycopg://someone@127.0.0.1:{_free_port()}/ranksearch", heartbeat_seconds=5)
    assert "\n" not in str(error.value) and "cannot open storage" in str(error.value)
    assert time.monotonic() - start < 10  # a refused connection is not a race: not retried


# Two `run`s started at the same instant, in a folder with no baseline and data with no decode cache.


def _digest(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns, stat.st_ino


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_two_runs_started_together_share_one_study_and_one_baseline(engine, request, tmp_path, tiny_imagefolder):
    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data, ignore=shutil.ignore_patterns(".ranksearch-cache*"))
    work = tmp_path / "work"
    work.mkdir()
    if engine == "sqlite":
        url, storage = f"sqlite:///{work / 'studies' / 'smoke.db'}", ()  # the default storage: a fresh file
    else:
        url = request.getfixturevalue("postgres_url")
        storage = ("--storage", url)
    trials = (2, 1)

    def command(i):
        run = ["run", "--config", str(SMOKE_CONFIG), "--data-dir", str(data), "--trials", str(trials[i]), *storage]
        return [sys.executable, "-m", "ranksearch", *run]

    commands = iter([command(0), command(1)])
    processes = start_together(2, lambda ready, go: ["sh", "-c", f"touch {ready}; exec \"$@\"", "-", *next(commands)],
                               work)  # fmt: skip
    # Each file that must be written once: what it was when first seen, against what it is at the end.
    watched = {"decode cache": data / CACHE_NAME}
    first_seen: dict[str, tuple] = {}
    while any(p.poll() is None for p in processes):
        for baseline in (work / "studies" / "baselines").glob("*.pt"):
            kind = "bases" if baseline.name.endswith(".bases.pt") else "baseline"
            watched.setdefault(kind, baseline)
        for kind, path in watched.items():
            if kind not in first_seen and path.exists():
                first_seen[kind] = _digest(path)
        time.sleep(0.05)
    outputs = [p.communicate() for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert "Traceback" not in err and "database is locked" not in err

    baselines = [p for p in (work / "studies" / "baselines").glob("*.pt") if not p.name.endswith(".bases.pt")]
    assert len(baselines) == 1
    assert set(first_seen) == {"decode cache", "baseline", "bases"}
    for kind, seen in first_seen.items():
        assert _digest(watched[kind]) == seen, f"the {kind} was written again after it first appeared"
    pretrained = [err for _, err in outputs if "baseline: pretrained in" in err]
    assert len(pretrained) == 1  # the other one waited for it, or found it
    assert sum("(cached)" in err for _, err in outputs) == 1

    study = optuna.load_study(study_name="smoke", storage=url)
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == sum(trials)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == sum(trials)
