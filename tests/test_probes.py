"""Probes from issue 19's hostile review: each misbehaved before its fix."""

import shutil

import optuna
import pytest

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.study.config import check_study_name
from ranksearch.utils.errors import UserError

NOT_NAMES = ["../../../escape", "a/b", "/abs/path", "", ".", "..", ".hidden", "x" * 300, "tab\tname", "new\nline"]


@pytest.mark.parametrize("name", NOT_NAMES, ids=range(len(NOT_NAMES)))
def test_a_study_name_that_is_no_name_is_refused_before_any_work(name, tmp_path, tiny_imagefolder):
    """``--study-name ../../../escape`` wrote escape.db three folders up; ``a/b`` failed after pretraining; ``""`` and
    ``.`` made hidden files; 300 characters gave a traceback."""
    cwd = tmp_path / "one" / "two" / "three"
    cwd.mkdir(parents=True)
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--study-name", name,
                     "--trials", "1", cwd=cwd)  # fmt: skip
    assert result.returncode == 2 and "is not a name" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no study, no baseline, nothing anywhere


def test_names_that_are_names_pass():
    for name in ("vgg16-cifar10", "resnet20-cifar10-cpu", "a", "Study_2.v3", "x" * 100):
        assert check_study_name(name) == name
    with pytest.raises(UserError):
        check_study_name("x" * 101)


def test_the_closing_pareto_line_counts_finished_trials_only():
    """"Pareto front: 3 of 4 trials" counted a queued trial that never ran."""
    from ranksearch.search.runner import pareto_summary

    study = optuna.create_study(directions=["maximize", "minimize"])
    grid = {"rank_b": optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)}
    for accuracy, macs in ((0.9, 100.0), (0.8, 50.0), (0.7, 80.0)):
        attrs = {"macs": macs, "macs_ratio": macs / 100}
        trial = optuna.trial.create_trial(values=[accuracy, macs], params={"rank_b": 0.5}, distributions=grid,
                                          user_attrs=attrs)  # fmt: skip
        study.add_trial(trial)
    study.enqueue_trial({"rank_b": 0.25})  # queued, never run
    assert pareto_summary(study, ["b"]).splitlines()[0].startswith("Pareto front: 2 of 3 complete trials")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_storage_is_refused(url, tmp_path, tiny_imagefolder):
    """``--storage sqlite://`` ran, printed heartbeat tracebacks, exited 0, and lost every result at exit."""
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--storage", url,
                     "--trials", "1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "in-memory database" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "studies").exists()  # refused before pretraining


def test_another_programs_sqlite_file_is_refused_and_left_as_it_was(tmp_path, tiny_imagefolder):
    """``--storage`` at another program's SQLite file exited 0 and added Optuna's 12 tables to it."""
    import sqlite3

    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    before = foreign.read_bytes()
    for command in (["run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1"],
                    ["report", "--study-name", "smoke", "--out", "r"]):  # fmt: skip
        result = run_cli(*command, "--storage", f"sqlite:///{foreign}", cwd=tmp_path)
        assert result.returncode == 2 and "another program's database (tables users)" in result.stderr, result.stderr
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    junk = run_cli("report", "--study-name", "smoke", "--storage", f"sqlite:///{tmp_path / 'junk.db'}", "--out", "r",
                   cwd=tmp_path)  # fmt: skip
    assert junk.returncode == 2 and "is not a SQLite database" in junk.stderr, junk.stderr
    assert foreign.read_bytes() == before


def test_the_dashboard_refuses_an_empty_host_and_warns_on_a_public_one(tmp_path, capsys):
    """``dashboard --host ""`` bound 0.0.0.0 and answered on the machine's address; ``--host 0.0.0.0`` said nothing."""
    from ranksearch.inspect.dashboard import make_dashboard_server

    url = f"sqlite:///{tmp_path / 'd.db'}"
    optuna.create_study(storage=url, study_name="d")
    with pytest.raises(UserError, match="--host is empty"):
        make_dashboard_server(url, "", 0)
    with pytest.raises(UserError, match="--host is empty"):
        make_dashboard_server(url, "   ", 0)
    make_dashboard_server(url, "127.0.0.1", 0).server_close()
    assert "warning" not in capsys.readouterr().err
    make_dashboard_server(url, "0.0.0.0", 0).server_close()
    assert "warning: serving on 0.0.0.0: anyone who can reach this machine" in capsys.readouterr().err


def test_onnx_without_the_deploy_extra_stops_before_any_work(tmp_path, monkeypatch):
    """``export --format pt,onnx`` found out about ``ranksearch[deploy]`` after 35 s of rebuilding and after writing
    the .pt."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: its import fails
    result = run_cli("export", "--study-name", "nope", "--format", "pt,onnx", "--out", "best.pt", cwd=tmp_path)
    assert result.returncode == 2 and 'pip install -e ".[deploy]"' in result.stderr, result.stderr
    assert "no study" not in result.stderr and list(tmp_path.iterdir()) == []  # said before the study is opened


def test_a_run_with_another_heartbeat_is_refused_before_it_touches_the_trials(workdir, tiny_imagefolder):
    """A second run with ``--heartbeat-seconds 1`` failed a live trial of the first; when that trial finished,
    ``Cannot tell a FAIL trial`` and its result was lost."""
    first = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                    cwd=workdir)  # fmt: skip
    assert first.returncode == 0, first.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    assert study.user_attrs["heartbeat_seconds"] == 60
    study.enqueue_trial(study.trials[0].params)
    running = study.ask()  # another run's trial in flight
    second = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                     "--heartbeat-seconds", "1", cwd=workdir)  # fmt: skip
    assert second.returncode == 2 and "runs with --heartbeat-seconds 60" in second.stderr, second.stderr
    again = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    assert again.trials[running.number].state.name == "RUNNING" and len(again.trials) == 2


def test_counts_past_their_caps_are_refused_before_any_work(tmp_path, tiny_imagefolder):
    """``--latency-batch 1000000000`` asked for 12 TB after creating the study (which then refused the next plain
    run); ``export --finetune-epochs 1000000000`` ran silently."""
    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--objectives",
                  "accuracy,latency", "--latency-batch", "1000000000", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 2 and "latency_batch" in run.stderr and "4096" in run.stderr, run.stderr
    assert not (tmp_path / "studies").exists()
    export = run_cli("export", "--study-name", "smoke", "--finetune-epochs", "1000000000", "--out", "x.pt",
                     cwd=tmp_path)  # fmt: skip
    assert export.returncode == 2 and "at most 1000" in export.stderr and not (tmp_path / "x.pt").exists()


def test_each_trial_and_the_study_get_a_readable_note_in_optuna_dashboard(workdir, tiny_imagefolder):
    """The dashboard showed ``rank_block1 0.84375``; the readable ``ranks`` attr was buried among ~20 attrs, every
    trial's Note was empty, and nothing on the study said what the objectives are."""
    from optuna_dashboard._note import get_note_from_system_attrs

    def run(trials: str) -> optuna.Study:
        result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", trials,
                         "--ranks", "8/32,8/32,4/32,2/32,1/32", cwd=workdir)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")

    study = run("2")
    study.enqueue_trial(study.trials[0].params)  # the same ranks again: the next trial copies trial 0
    study = run("1")
    attrs = study._storage.get_study_system_attrs(study._study_id)
    first, copy = (get_note_from_system_attrs(attrs, t._trial_id)["body"] for t in (study.trials[0], study.trials[2]))
    assert first.startswith("## Trial 0: complete") and "| block1 | 8/32 |" in first and "| block5 | 1/32 |" in first
    macs, ratio = study.trials[0].user_attrs["macs"], study.trials[0].user_attrs["macs_ratio"]
    assert f"| MACs | {macs:,} | {ratio:.3f}x |" in first and "- weights: " in first
    pasted = "python -m ranksearch export --study-name smoke --trial 0 \\\n    --out exports/smoke-trial0.pt"
    assert f"\n```\n{pasted}\n```\n" in first  # broken to fit a note box; into exports/, not the current folder
    exported = run_cli(*pasted.replace("\\", "").split()[3:], cwd=workdir)  # as pasted into the study's folder
    assert exported.returncode == 0 and (workdir / "exports" / "smoke-trial0.pt").is_file(), exported.stderr
    baseline_val = study.user_attrs["baseline"]["val_accuracy"]
    drop = 100 * (study.trials[0].values[0] - baseline_val)
    assert f"(baseline {baseline_val:.2%}: {drop:+.2f} points)" in first  # the accuracy it gave up
    assert "copied from trial 0" in copy and "| block3 | 4/32 |" in copy
    head = get_note_from_system_attrs(attrs, None)["body"]
    assert "val accuracy (maximise) vs MACs (minimise)" in head and "**Baseline**: val " in head
    assert '"finetune_steps": 3' in head and "fingerprint" in head


def test_a_note_names_the_study_and_its_storage_without_the_password():
    """The note said ``ranksearch export --trial 5``: export needs --study-name, so the pasted line failed."""
    from ranksearch.inspect.notes import export_command

    assert export_command("s", None) == export_command("s", "sqlite:///studies/s.db") == (
        "python -m ranksearch export --study-name s")  # fmt: skip
    assert export_command("s", "postgresql+psycopg://me:secret@db/studies") == (
        "python -m ranksearch export --study-name s --storage postgresql+psycopg://me:***@db/studies")  # fmt: skip


def test_a_signal_handler_never_raises_it_flags_and_the_trial_stops_at_its_next_step(monkeypatch):
    """SIGTERM to ``run --workers 2``: 1 in 8 printed "Exception ignored ... KeyboardInterrupt" from a SQLAlchemy
    callback (the handler raised where it landed), and the worker went on to the end."""
    import signal

    from ranksearch.search import workers
    from ranksearch.utils.interrupts import Signals, interruption_point

    monkeypatch.setattr(Signals, "in_trial", True)
    monkeypatch.setattr(Signals, "pending", False)
    interruption_point()  # nothing asked: goes on
    workers._interrupt(signal.SIGTERM, None)  # as if it landed inside a library callback: no exception there
    assert Signals.pending
    with pytest.raises(KeyboardInterrupt):
        interruption_point()  # the next training step or evaluation batch
    monkeypatch.setattr(Signals, "in_trial", False)
    interruption_point()  # between trials: the run stops before the next trial instead


def test_a_trial_number_that_int_cannot_read_is_one_line(tmp_path):
    """``export --trial ³`` (a digit to ``str.isdigit``) gave a traceback."""
    url = f"sqlite:///{tmp_path / 'hand.db'}"
    optuna.create_study(storage=url, study_name="hand", directions=["maximize", "minimize"])
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--trial", "³", "--out", "x.pt", cwd=tmp_path)
    assert result.returncode == 2 and "give a trial number or 'best'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_as_sqlite_storage_is_refused_at_start_up(tmp_path, tiny_imagefolder):
    """``--storage sqlite:///DIR`` was accepted at start-up and failed after pretraining."""
    (tmp_path / "dir").mkdir()
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--storage",
                     f"sqlite:///{tmp_path / 'dir'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "names a folder" in result.stderr and not (tmp_path / "studies").exists()


@pytest.mark.parametrize("kind", ["dangling link", "fifo"])
def test_image_names_that_are_no_regular_files_are_named(kind, tmp_path):
    """A FIFO named ``.jpg`` hung the decoder silently; a dangling ``.jpg`` link gave a traceback."""
    import os

    from conftest import write_imagefolder
    from ranksearch.data.datasets import load_dataset

    data = write_imagefolder(tmp_path / "data", train_per_class=2, test_per_class=1)
    odd = data / "train" / "class3" / "odd.jpg"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(UserError, match=r"1 image name\(s\) in .* are not regular files .*odd\.jpg; remove them"):
        load_dataset(data)


def test_damaged_kept_weights_are_reported_and_the_fine_tune_re_run(workdir, tiny_imagefolder):
    """A damaged kept-weights file (random bytes, a pickle, a dict) gave a traceback at export."""
    from ranksearch.study.weights import WeightsStore

    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                  "--ranks", "8/32,8/32,8/32,8/32,8/32", cwd=workdir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    store = WeightsStore(study.user_attrs["weights_dir"])
    files = [p for p in store.directory.rglob("*") if p.is_file()]
    assert len(files) == 1
    files[0].write_bytes(b"\\x00 not a checkpoint" * 64)
    export = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", "x.pt", cwd=workdir)
    assert export.returncode == 0, export.stderr
    assert "kept weights are damaged" in export.stderr and "re-run from seed" in export.stdout


def test_a_postgresql_port_that_never_answers_times_out_in_one_line(tmp_path, monkeypatch):
    """A PostgreSQL URL to a loopback port that accepts and never answers hung silently past 60 s."""
    import socket

    from ranksearch.study import storage as study_module

    monkeypatch.setattr(study_module, "CONNECT_TIMEOUT", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel does), says nothing
        url = f"postgresql+psycopg://someone@127.0.0.1:{silent.getsockname()[1]}/ranksearch"
        result = run_cli("report", "--study-name", "s", "--storage", url, "--out", "r", cwd=tmp_path)
    assert result.returncode == 2 and "within 2 s" in result.stderr, result.stderr  # the timeout's own error
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_exports_to_one_out_take_turns(workdir, tiny_imagefolder):
    """Two ``export``s at once to one ``--out``: 2 of 11 pairs left a .pt of one trial beside a .ts of the other.
    An export waits while another holds its ``--out``, and writes nothing until then."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO
    from ranksearch.utils.files import folder_lock

    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                  "--ranks", "8/32,8/32,8/32,8/32,8/32", cwd=workdir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out, log = workdir / "both.pt", workdir / "export.log"
    command = [sys.executable, "-m", "ranksearch", "export", "--study-name", "smoke", "--trial", "0", "--format",
               "pt,torchscript", "--out", str(out)]  # fmt: skip
    with folder_lock(workdir), log.open("w") as stderr:  # as if another export were writing into this folder
        process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        deadline = time.monotonic() + 300
        while "another export is writing" not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert process.poll() is None and not out.exists() and not (workdir / "both.ts").exists(), log.read_text()
    assert process.wait(timeout=300) == 0, log.read_text()
    assert out.is_file() and (workdir / "both.ts").is_file()


def test_a_long_cpu_run_says_how_long_after_its_first_trial():
    """``run`` without a config on a CPU asked for 200 trials and gave no hint that it would take hours."""
    import datetime
    import io

    from ranksearch.inspect.progress import LongRunNote

    start = datetime.datetime(2026, 12, 1, 12, 0, 0)

    def finished(seconds: float) -> optuna.trial.FrozenTrial:
        return optuna.trial.FrozenTrial(
            number=0, state=optuna.trial.TrialState.COMPLETE, value=None, values=[0.5, 1.0], datetime_start=start,
            datetime_complete=start + datetime.timedelta(seconds=seconds), params={}, distributions={},
            user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=0)  # fmt: skip

    out = io.StringIO()
    note = LongRunNote(200, out=out)
    note(None, finished(20.0))
    note(None, finished(20.0))  # once
    assert out.getvalue().splitlines() == [
        "note: at this trial's 20 s, the 200 trials asked take about 1:06:40 on this CPU; configs/cpu.yaml is sized "
        "for a CPU (--config configs/cpu.yaml --trials 20: 4-9 min on 2 idle cores)"]  # fmt: skip
    quiet = io.StringIO()
    LongRunNote(20, out=quiet)(None, finished(20.0))  # 400 s in all: nothing to say
    assert quiet.getvalue() == ""


def test_an_image_edited_in_place_keeping_size_and_mtime_is_decoded_again(tmp_path):
    """The decode cache kept the old pixels of an image rewritten with the same size and modification time."""
    import os

    import numpy as np
    from PIL import Image

    from conftest import write_imagefolder
    from ranksearch.data.datasets import load_dataset

    data = write_imagefolder(tmp_path / "data", train_per_class=2, test_per_class=1)
    image = data / "train" / "class0" / "raw.bmp"  # BMP: raw pixels, so an edit keeps the file's size
    Image.fromarray(np.full((32, 32, 3), 20, dtype=np.uint8)).save(image)
    before = load_dataset(data)
    stat, raw = image.stat(), bytearray(image.read_bytes())
    raw[-300:] = bytes(255 - b for b in raw[-300:])  # other pixels, same size
    image.write_bytes(bytes(raw))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the modification time set back
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    after = load_dataset(data)
    assert not np.array_equal(before.train.images.numpy(), after.train.images.numpy())


def test_a_storage_that_stops_taking_writes_mid_run_is_one_line(monkeypatch):
    """``studies/`` made unwritable mid-run gave a traceback (the trial stays RUNNING until the heartbeat)."""
    import sqlalchemy

    from ranksearch.search.workers import Worker, optimize_share

    study = optuna.create_study()

    def read_only(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("attempt to write a readonly database"))

    monkeypatch.setattr(study._storage, "set_trial_state_values", read_only)
    with pytest.raises(UserError, match=r"cannot write to the study's storage any more \(.*readonly database"):
        optimize_share(study, lambda trial: trial.suggest_float("x", 0, 1), Worker("r", 0, 2), 2, callbacks=[])


def test_a_failure_timing_the_baselines_latency_leaves_no_study(tmp_path, tiny_imagefolder, monkeypatch):
    """``--latency-batch 1000000000``: a 12 TB allocation traceback after the study was created, and the next plain
    run was refused ("exists with directions ..."); the same after Ctrl-C during the baseline's latency timing."""
    from ranksearch.objectives import latency

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 12000000000000 bytes")

    monkeypatch.setattr(latency, "measure_latency", out_of_memory)
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--objectives",
                     "accuracy,latency", "--latency-batch", "4096", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "lower --latency-batch" in result.stderr, result.stderr
    assert not list((tmp_path / "studies").glob("*.db"))  # no study: the next plain run starts afresh


def test_the_same_run_in_a_fresh_folder_repeats_its_study(tmp_path, pretrained, tiny_imagefolder):
    """The new-user walk ran the CPU command twice: the same trials 0-3 (queued), then other draws from trial 4 on,
    because each run seeded its sampler with a random run id. The config's ``seed`` now decides them."""
    studies = []
    for folder in ("first", "second"):
        cwd = tmp_path / folder
        shutil.copytree(pretrained, cwd / "studies" / "baselines")
        result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "4",
                         "--sampler", "tpe", cwd=cwd)  # fmt: skip
        assert result.returncode == 0, result.stderr
        studies.append(optuna.load_study(study_name="smoke", storage=f"sqlite:///{cwd}/studies/smoke.db"))
    first, second = ([(t.params, t.values) for t in study.trials] for study in studies)
    assert first == second and len({str(params) for params, _ in first}) == 4
