"""Probes from issue 24's hostile review (secrets, markup, a blocked or killed storage, pixel formats, long latency
timing): each misbehaved before its fix."""

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import REPO, SMOKE_CONFIG, run_cli
from ranksearch.study.attrs import FAIL_REASON
from ranksearch.utils.errors import UserError, shown_url

SECRET = "secretpw"
HOSTILE = "<img src=x onerror=alert(1)> [x](javascript:alert(1))"


def _with_password(url: str) -> str:
    """The conftest server's URL with a password in it (the server trusts its user, so any password connects)."""
    return url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{SECRET}@")


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://rs:secretpw@host/db", "postgresql+psycopg://rs:***@host/db"),
    ("postgresql+psycopg://rs:secret@pw@host:port/db", "postgresql+psycopg://rs:***@host:port/db"),
    ("postgresql+psycopg//rs:secretpw@host/db", "postgresql+psycopg//rs:***@host/db"),
    ("postgresql://rs@host/db?sslmode=require&password=secretpw", "postgresql://rs@host/db?sslmode=require&password=***"),
    ("sqlite:///studies/a:b@c.db", "sqlite:///studies/a:b@c.db"),
])  # fmt: skip
def test_shown_url_masks_a_password_even_where_sqlalchemy_cannot_parse_the_url(url, shown):
    assert shown_url(url) == shown


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://rs:secretpw@127.0.0.1:1/db",  # nothing listens there
    "postgresql+psycopg://rs:secretpw@host:port/db",  # SQLAlchemy cannot parse the port
    "postgresql+psycopg//rs:secretpw@host/db",  # not a URL at all
])  # fmt: skip
def test_a_storage_that_cannot_be_opened_is_named_without_its_password(url, tmp_path):
    """Every "cannot open storage" error echoed the password, a wrong one too."""
    for command in (["report", "--out", "r"], ["export", "--out", "m.pt"], ["dashboard", "--port", "0"]):
        result = run_cli(command[0], "--study-name", "s", "--storage", url, *command[1:], cwd=tmp_path)
        assert result.returncode == 2 and "cannot open storage" in result.stderr, result.stderr
        assert SECRET not in result.stdout + result.stderr and "***" in result.stderr


def test_run_and_a_missing_study_never_print_the_password(postgres_url, workdir, tiny_imagefolder):
    """``run --storage postgresql+psycopg://rs:secretpw@...`` printed the password twice in its closing line; "no
    study ... in URL" printed it too."""
    url = _with_password(postgres_url)
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                     "--storage", url, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    closing = result.stdout.strip().splitlines()[-1]
    shown = shown_url(url)
    assert closing == (f"study 'smoke' in {shown}; inspect: python -m ranksearch dashboard --study-name smoke "
                       f"--storage {shown} (with the real password for ***)")  # fmt: skip
    assert optuna.load_study(study_name="smoke", storage=url).trials[0].state.name == "COMPLETE"
    missing = run_cli("report", "--study-name", "nope", "--storage", url, "--out", "r", cwd=workdir)
    assert missing.returncode == 2 and "no study 'nope' in" in missing.stderr, missing.stderr
    assert SECRET not in missing.stdout + missing.stderr


def test_a_failed_trials_note_escapes_the_path_in_its_error():
    """A working folder named like HTML and a ``javascript:`` link, weights unwritable: the failed trial's note
    stored the path verbatim, and optuna-dashboard renders notes as Markdown with HTML."""
    from ranksearch.inspect.notes import export_command, trial_note

    error = f"PermissionError: [Errno 13] Permission denied: '/tmp/{HOSTILE}/studies/smoke-weights/t0.pt'"
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={FAIL_REASON: error})
    note = trial_note(trial, [HOSTILE, "block2"], [], export_command("smoke", f"sqlite:///{HOSTILE}.db"))
    assert "<img" not in note and "](javascript:" not in note and "&lt;img" in note
    assert "failed: PermissionError" in note and "| block2 |" in note


def test_the_study_note_escapes_the_data_and_model_it_names_and_fences_the_config():
    from ranksearch.inspect.notes import study_note

    config = {"model": HOSTILE, "data_dir": f"/x/```\n{HOSTILE}", "budget": None}
    baseline = {"val_accuracy": 0.5, "test_accuracy": 0.5, "macs": 10, "params": 2}
    data = {"source": f"imagefolder {HOSTILE}", "fingerprint": "ab"}
    note = study_note(config, baseline, data, ["accuracy", "macs"])
    outside_code = note.split("````json")[0]
    assert "<img" not in outside_code and "](javascript:" not in outside_code
    assert note.rstrip().endswith("````")  # the config's own ``` cannot close its block early


def _locked_trials(url: str):
    """A second session holding ``LOCK TABLE trials IN ACCESS EXCLUSIVE MODE`` (released when closed, or by the
    server after 60 s idle: a hang fails the test rather than stalling the suite)."""
    import psycopg

    holder = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    holder.execute("SET idle_in_transaction_session_timeout = '60s'")
    holder.execute("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE")
    return holder


def test_a_storage_blocked_by_another_sessions_lock_fails_in_one_line(postgres_url, workdir, tiny_imagefolder,
                                                                      monkeypatch):  # fmt: skip
    """Another session's ``LOCK TABLE trials IN ACCESS EXCLUSIVE MODE``: no output for 90 s (a connect timeout but
    no lock timeout). The lock timeout is lowered to 1 s here; it is ``LOCK_TIMEOUT`` (30 s) for users."""
    from ranksearch.study import storage as study_module

    run = ("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
           "--storage", postgres_url)  # fmt: skip
    assert run_cli(*run, cwd=workdir).returncode == 0
    monkeypatch.setattr(study_module, "LOCK_TIMEOUT", 1)
    holder = _locked_trials(postgres_url)
    try:
        for command in (run, ("report", "--study-name", "smoke", "--storage", postgres_url, "--out", "r")):
            result = run_cli(*command, cwd=workdir)
            assert result.returncode == 1, result.stderr
            line = "ranksearch: error: the study's storage failed (canceling statement due to lock timeout: another"
            assert result.stderr.startswith(line) and "for over 1 s" in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    finally:
        holder.close()
    assert len(optuna.load_study(study_name="smoke", storage=postgres_url).trials) == 1


def test_a_killed_storage_is_reported_by_its_own_error_not_optunas_max_length_guess():
    """PostgreSQL killed mid-run: "invalid data in the commit, e.g. exceeding max length" (Optuna's wrapper)."""
    import sqlalchemy

    from ranksearch.study.storage import storage_failure

    driver = Exception("consuming input failed: server closed the connection unexpectedly\nThis probably means...")
    try:
        try:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, driver)
        except sqlalchemy.exc.OperationalError as error:
            message = "An exception is raised during the commit. This typically happens due to invalid data ..."
            raise optuna.exceptions.StorageInternalError(message) from error
    except optuna.exceptions.StorageInternalError as wrapped:
        assert storage_failure(wrapped) == "consuming input failed: server closed the connection unexpectedly"
    assert storage_failure(ValueError("not a storage")) is None


def _replace_image(root, name: str, pixels, suffix: str = ".png"):
    """Replace train/class3/0000.png by ``pixels`` saved as ``name`` + ``suffix`` (Pillow picks the format)."""
    from PIL import Image

    (root / "train" / "class3" / "0000.png").unlink()
    path = root / "train" / "class3" / f"{name}{suffix}"
    Image.fromarray(pixels).save(path)
    return path


def test_a_16_bit_png_keeps_its_gray_levels(tmp_path):
    """A 16-bit PNG decoded to 99.6 % white (its values clipped at 255)."""
    import numpy as np

    from conftest import write_imagefolder
    from ranksearch.data.datasets import load_dataset

    root = write_imagefolder(tmp_path / "data", train_per_class=2, test_per_class=1)
    levels = np.tile(np.arange(32, dtype=np.uint16) * 2048, (32, 1))  # 0 .. 63488 across each row
    _replace_image(root, "0000-16bit", levels)
    train = load_dataset(root).train
    images = train.images[train.labels == 3]
    decoded = next(image for image in images if int(image[0, 5, 31]) != int(image[0, 5, 0]))  # the 16-bit one
    assert decoded[:, 5, :].tolist() == [[level >> 8 for level in range(0, 65536, 2048)]] * 3


@pytest.mark.parametrize("dtype, suffix", [("float32", ".tif"), ("float32", ".png"), ("int32", ".tiff")])
def test_a_32_bit_image_is_refused_naming_the_file(tmp_path, dtype, suffix):
    """A float TIFF decoded to black, silently (and a .tif was not even looked at)."""
    import numpy as np

    from conftest import write_imagefolder
    from ranksearch.data.datasets import load_dataset

    root = write_imagefolder(tmp_path / "data", train_per_class=2, test_per_class=1)
    pixels = np.random.default_rng(0).random((32, 32)).astype(dtype)
    path = _replace_image(root, "0000-float", pixels, ".tif")
    if suffix != ".tif":
        path = path.rename(path.with_suffix(suffix))  # a TIFF by its content, whatever its name
    with pytest.raises(UserError, match=rf"cannot be decoded, first {path} \(PixelFormatError: 32-bit "):
        load_dataset(root)


class _FakeClock:
    """``time.perf_counter`` of a machine where every forward pass takes ``seconds``: no real time passes."""

    def __init__(self, seconds: float):
        self.now, self.seconds, self.passes = 0.0, seconds, 0

    def __call__(self) -> float:
        return self.now

    def forward(self, x):
        self.now += self.seconds
        self.passes += 1
        return x


def test_a_slow_latency_measurement_says_how_far_it_is_and_stops_near_its_limit(monkeypatch):
    """``--latency-batch 4096``: 148 s without a line, while the README said timing takes at most 10 s (the warm-up
    did not count, and the 10 s were checked after whole rounds of 10 runs)."""
    from torch import nn

    from ranksearch.objectives import latency

    clock = _FakeClock(4.0)  # 4 s a forward pass
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    model = nn.Module()
    model.forward = clock.forward
    lines = []
    result = latency.measure_latency(model, batch=4096, progress=lines.append)
    assert result.runs == latency.MIN_TIMED_RUNS and not result.stable
    assert clock.passes == 3 + latency.MIN_TIMED_RUNS  # warm-up ended at 12 s: 3 passes instead of 5
    assert lines and all(line.startswith("latency at batch 4096: ") for line in lines), lines


def test_a_fast_latency_measurement_prints_nothing(monkeypatch):
    from torch import nn

    from ranksearch.objectives import latency

    clock = _FakeClock(0.001)
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    model = nn.Module()
    model.forward = clock.forward
    lines = []
    result = latency.measure_latency(model, progress=lines.append)
    assert result.stable and result.runs == 30 and lines == []  # 3 rounds of 10, the same time each run


def test_the_trial_latency_meter_prints_its_progress(monkeypatch, capsys):

    from torch import nn

    from ranksearch.objectives import latency

    clock = _FakeClock(6.0)
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    monkeypatch.setattr(latency, "deployed_form", lambda model, input_shape, device: model)
    model = nn.Module()
    model.forward = clock.forward
    meter = latency.LatencyMeter(4096, "tucker2", latency.CPU, model)
    assert meter.baseline_ms == 6000.0
    assert "latency at batch 4096: " in capsys.readouterr().out


@pytest.fixture
def own_postgres_server(tmp_path_factory):
    """A PostgreSQL server of this test's own (the session's is shared): yields (port, stop)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from conftest import PG_BIN, _as_postgres, _free_port

    folder = Path(tempfile.mkdtemp(prefix="ranksearch-pg-kill-"))
    data = folder / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(data, "postgres")
    assert _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--no-sync").returncode == 0  # fmt: skip
    port = _free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w",
                           "start")  # fmt: skip
    assert started.returncode == 0, started.stderr

    def stop(mode: str = "immediate") -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "stop")

    try:
        yield port, stop
    finally:
        stop("fast")
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_killed_mid_run_is_one_line_with_the_servers_own_error(own_postgres_server, workdir,
                                                                         tiny_imagefolder):  # fmt: skip
    """PostgreSQL killed mid-run: "invalid data in the commit, e.g. exceeding max length" (Optuna's guess)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    port, stop = own_postgres_server
    url = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{port}/postgres"
    command = [sys.executable, "-m", "ranksearch", "run", "--config", str(SMOKE_CONFIG), "--data-dir",
               str(tiny_imagefolder), "--trials", "30", "--finetune-steps", "20", "--storage", url]  # fmt: skip
    run = subprocess.Popen(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for line in run.stdout:
        if line.startswith("[1/30]"):
            stop()  # kill -9 of the server, in effect
            break
    out, err = run.communicate(timeout=300)
    assert run.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("ranksearch: error: cannot write to the study's storage any more (")
    assert "Traceback" not in err and "exceeding max length" not in err and SECRET not in out + err
    # the server's own words, whichever moment of its shutdown the run met
    said = ("server closed the connection", "Connection refused", "the database system is shutting down")
    assert any(text in err for text in said), err


def test_storage_aside_takes_the_url_off_the_command_line():
    from ranksearch.search.workers import storage_aside
    from ranksearch.study.config import WORKER_STORAGE_ENV

    url = "postgresql+psycopg://rs:secretpw@db/studies"
    for argv in (["run", "--storage", url, "--trials", "4"], ["run", f"--storage={url}", "--trials", "4"]):
        kept, env = storage_aside(argv)
        assert kept == ["run", "--trials", "4"] and env == {WORKER_STORAGE_ENV: url}
    assert storage_aside(["run", "--trials", "4"]) == (["run", "--trials", "4"], {})


def test_workers_get_the_storage_off_their_command_line(postgres_url, workdir, tiny_imagefolder):
    """``run --workers 2 --storage URL`` started its workers with the URL, password included, on their command
    lines, which every user of the machine can read (``ps``, /proc/PID/cmdline)."""
    url = _with_password(postgres_url)
    config = workdir / "slow.yaml"
    config.write_text(SMOKE_CONFIG.read_text().replace("finetune_steps: 3", "finetune_steps: 60"))
    command = [sys.executable, "-m", "ranksearch", "run", "--config", str(config), "--data-dir",
               str(tiny_imagefolder), "--trials", "4", "--workers", "2", "--storage", url]  # fmt: skip
    parent = subprocess.Popen(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    seen: dict[int, bytes] = {}
    while parent.poll() is None:
        for task in Path(f"/proc/{parent.pid}/task").glob("*/children"):
            for child in task.read_text().split() if task.exists() else []:
                with contextlib.suppress(OSError):
                    line = Path(f"/proc/{child}/cmdline").read_bytes()  # empty while it starts or once it ended
                    seen |= {int(child): line} if line else {}
        time.sleep(0.05)
    out, err = parent.communicate()
    assert parent.returncode == 0, err
    assert seen and all(b"--worker" in line for line in seen.values()), seen  # the workers were looked at
    assert not any(SECRET.encode() in line or b"--storage" in line for line in seen.values()), seen
    study = optuna.load_study(study_name="smoke", storage=url)  # the workers wrote there, not to a default file
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4
    assert not (workdir / "studies" / "smoke.db").exists()
