"""Probes from issue 24's third hostile review, on ``export`` and ``report``: each misbehaved before its fix."""

import hashlib
import shutil
import subprocess
import sys
import types
from pathlib import Path

import optuna
import pytest
import torch

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.study.config import Config

DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)
BASELINE = {"val_accuracy": 0.9, "test_accuracy": 0.9, "macs": 1000, "params": 10}
FORMATS = ("--format", "pt,onnx,torchscript")


def one_line_error(result, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


# ----- hand-built studies: nothing trained -------------------------------------------------------------------------


def hand_study(url: str, name: str = "hand", directions=("maximize", "minimize"), config=None, trials=1):
    """A study with ``trials`` complete trials (val 0.89, MACs 100) and a baseline, as ``run`` records them."""
    study = optuna.create_study(directions=list(directions), storage=url, study_name=name)
    study.set_user_attr("baseline", BASELINE)
    study.set_user_attr("config", config if config is not None else {"model": "vgg16"})
    for _ in range(trials):
        values = [0.89, 100.0][: len(directions)]
        study.add_trial(optuna.trial.create_trial(params={"rank_block1": 0.5}, distributions={"rank_block1": DIST},
                                                  values=values, user_attrs={"macs_ratio": 0.1}))  # fmt: skip
    return study


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'hand.db'}"


@pytest.fixture
def sensitivity_study(url) -> str:
    """A study of sensitivity points, written by ``open_sensitivity`` itself (a baseline only named), with one
    measured point."""
    from ranksearch.search.sensitivity import open_sensitivity

    baseline = types.SimpleNamespace(path=Path("baseline.pt"), metrics=lambda: BASELINE)
    study = open_sensitivity(Config(model="vgg16", study_name="smoke", storage=url), baseline)
    grid = {"module": optuna.distributions.CategoricalDistribution(["block1", "block2"]), "rank": DIST}
    study.add_trial(optuna.trial.create_trial(params={"module": "block1", "rank": 0.25}, distributions=grid,
                                              value=0.45, user_attrs={"macs_ratio": 0.75}))  # fmt: skip
    return study.study_name


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # open_sensitivity's metric names
@pytest.mark.parametrize("command", [
    ("report", "--out", "rep"), ("export", "--out", "s.pt"), ("export", "--trial", "best", "--out", "s.pt"),
    ("export", "--trial", "0", "--out", "s.pt"),
])  # fmt: skip
def test_report_and_export_say_what_a_sensitivity_study_is(tmp_path, url, sensitivity_study, command):
    """W8, T: ``report`` on the sensitivity study printed "best val accuracy within budget None: ... ranks  /32";
    ``export`` said "the baseline . ... is gone", or (``--trial best``) gave a traceback."""
    result = run_cli(command[0], "--study-name", sensitivity_study, "--storage", url, *command[1:], cwd=tmp_path)
    one_line_error(result, "holds `ranksearch sensitivity`'s points")
    assert f"{command[0]} reads a study made by `ranksearch run`; pass its --study-name" in result.stderr
    assert not (tmp_path / "rep").exists() and not (tmp_path / "s.pt").exists()


def test_export_of_a_trial_number_of_5000_digits_is_one_line(tmp_path, url):
    """T: ``int()`` refused the 5,000 digits with a traceback."""
    hand_study(url)
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--trial", "1" * 5000, "--out", "x.pt",
                     cwd=tmp_path)  # fmt: skip
    one_line_error(result, "(5,000 digits): study 'hand' has no such trial")
    assert len(result.stderr) < 300


@pytest.mark.parametrize("out,message", [
    ("", "argument --out: an empty path"), ("/", "--out '/' names no file; give a file name"),
    ("..", "names no file"),
])  # fmt: skip
def test_export_out_that_names_no_file_is_one_line(tmp_path, url, out, message):
    """T: ``--out ''`` and ``--out /`` ended in ``ValueError: PosixPath('.') has an empty name``."""
    hand_study(url)
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--trial", "0", "--out", out, cwd=tmp_path)
    one_line_error(result, message)


def test_a_folder_where_the_refine_keeps_its_checkpoint_is_refused_before_any_work(tmp_path, url):
    """T: a folder at ``<out>.pt.refine.pt`` let the refine run, then its first checkpoint failed with
    IsADirectoryError (a traceback)."""
    hand_study(url)
    (tmp_path / "y.pt.refine.pt").mkdir()
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--trial", "0", "--out", "y.pt",
                     "--finetune-epochs", "1", cwd=tmp_path)  # fmt: skip
    one_line_error(result, "y.pt.refine.pt, where the refine keeps its checkpoint, is a folder")


@pytest.mark.parametrize("flags,message", [
    (("--refine-lr", "1e9"), "--refine-lr must be a finite number > 0, at most 10, got 1000000000.0"),
    (("--refine-lr", "1e300"), "--refine-lr must be a finite number > 0, at most 10"),
    (("--refine-warmup-epochs", "50"), "--refine-warmup-epochs must be a finite number >= 0 and below "
                                       "--finetune-epochs 2, got 50.0"),
    (("--refine-warmup-epochs", "2"), "below --finetune-epochs 2"),
    (("--max-drop", "nan"), "--max-drop must be a finite number >= 0"),
    (("--max-drop", "inf"), "--max-drop must be a finite number >= 0"),
])  # fmt: skip
def test_refine_and_pick_flags_that_cannot_work_are_refused(tmp_path, url, flags, message):
    """T: ``--refine-lr 1e9`` diverged (``TrainingDiverged``), ``1e300`` overflowed SGD (RuntimeError), both as
    tracebacks. U: ``--refine-warmup-epochs 50`` with 2 epochs and ``--max-drop nan`` were accepted."""
    hand_study(url)
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--out", "x.pt", "--finetune-epochs", "2",
                     *flags, cwd=tmp_path)  # fmt: skip
    one_line_error(result, message)


def test_a_budget_study_refuses_objective_and_max_drop(tmp_path, url):
    """U: a budget study ignored ``--objective`` and ``--max-drop 0`` silently (its 'best' is its best val
    accuracy within the budget)."""
    hand_study(url, directions=("maximize",), config={"model": "vgg16", "budget": "macs=0.3"})
    for flags in (("--max-drop", "0"), ("--objective", "params"), ("--max-drop", "0", "--objective", "macs")):
        result = run_cli("export", "--study-name", "hand", "--storage", url, "--out", "x.pt", *flags, cwd=tmp_path)
        one_line_error(result, "study 'hand' is a budget study (macs=0.3), whose 'best' trial is its best val")
        assert result.stderr.startswith(f"ranksearch: error: {' and '.join(flags[::2])}:"), result.stderr
    plain = run_cli("export", "--study-name", "hand", "--storage", url, "--out", "x.pt", cwd=tmp_path)
    assert "picked trial 0 " in plain.stdout and "within budget macs=0.3" in plain.stdout  # and then no data: 2


def test_max_drop_with_a_trial_number_is_refused(tmp_path, url):
    """``--max-drop`` and ``--objective`` choose 'best': with ``--trial 0`` they did nothing, silently."""
    hand_study(url)
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--trial", "0", "--max-drop", "5", "--out",
                     "x.pt", cwd=tmp_path)  # fmt: skip
    one_line_error(result, "--max-drop: it chooses the 'best' trial, and do nothing with --trial 0")


def test_best_of_a_study_without_a_complete_trial_says_so(tmp_path, url):
    """U: ``export --trial best`` on a study with no complete trial said "raise --max-drop"."""
    hand_study(url, trials=0)
    result = run_cli("export", "--study-name", "hand", "--storage", url, "--out", "x.pt", cwd=tmp_path)
    one_line_error(result, "study 'hand' has no complete trial yet; run it first")
    assert "--max-drop" not in result.stderr


@pytest.mark.parametrize("command", [("report", "--study-name", "hand"), ("sensitivity", "--config", "x.yaml")])
def test_an_empty_out_is_refused(tmp_path, url, command):
    """U: ``report --out ''`` and ``sensitivity --out ''`` wrote into the current folder."""
    hand_study(url)
    result = run_cli(*command, "--storage", url, "--out", "", cwd=tmp_path)
    one_line_error(result, "argument --out: an empty path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hand.db"]


# ----- stale temporaries (C2) --------------------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_our_stale_temporaries_of_dead_writers_are_cleared(tmp_path):
    """C2: a kill -9 during the ONNX write left ``.m.onnx.<pid>-<hex>.partial`` for good."""
    import os

    from ranksearch.utils.files import clear_stale_partials

    dead, live = dead_pid(), os.getpid()
    stale = [tmp_path / f".m.onnx.{dead}-0123abcd.partial", tmp_path / f".m.pt.{dead}-89abcdef.partial"]
    kept = [
        tmp_path / f".m.onnx.{live}-0123abcd.partial",  # a writer at work
        tmp_path / f".other.onnx.{dead}-0123abcd.partial",  # another name's
        tmp_path / f".m.onnx.{dead}-nothex00.partial",  # not ours
        tmp_path / "m.onnx.partial",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(clear_stale_partials([tmp_path / "m.onnx", tmp_path / "m.pt", tmp_path / "m.ts"])) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


# ----- interrupted exports (C1, C2) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_trials(tmp_path_factory, tiny_imagefolder, pretrained) -> Path:
    """A working folder with a two-trial smoke study (other ranks each) and its baseline."""
    cwd = tmp_path_factory.mktemp("probes24-export")
    shutil.copytree(pretrained, cwd / "studies" / "baselines")
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "2",
                     "--ranks", "4/32,4/32,4/32,4/32,4/32", "--ranks", "8/32,8/32,8/32,8/32,8/32",
                     cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cwd


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def earlier_set(two_trials, tmp_path) -> tuple[Path, dict[str, str]]:
    """``out/m.pt``, ``m.onnx`` and ``m.ts`` of trial 1 in a fresh folder, and their digests."""
    out = tmp_path / "out"
    result = run_cli("export", "--study-name", "smoke", "--trial", "1", *FORMATS, "--out", str(out / "m.pt"),
                     cwd=two_trials)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert torch.load(out / "m.pt", weights_only=True)["trial_number"] == 1
    return out, digests(out)


def assert_one_export(out: Path, earlier: dict[str, str], trial: int | None = None) -> str:
    """The files at ``out`` (less hidden temporaries) are all the earlier export's, or all another's (and that one
    of ``trial`` when its .pt is there): never a mix. Returns "earlier" or "later"."""
    found = {name: digest for name, digest in digests(out).items() if not name.startswith(".")}
    kinds = {"earlier" if earlier.get(name) == digest else "later" for name, digest in found.items()}
    assert len(kinds) == 1, (found, earlier)
    if "m.pt" in found and kinds == {"later"} and trial is not None:
        assert torch.load(out / "m.pt", weights_only=True)["trial_number"] == trial
    return kinds.pop()


def killing(tmp_path: Path, code: str) -> Path:
    """A folder with a ``sitecustomize.py`` running ``code`` in the export's process (``run_cli(pythonpath=)``)."""
    folder = tmp_path / "patch"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return folder


KILL_DURING_ONNX = """
import os, signal, torch.onnx
original = torch.onnx.export
def export(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
torch.onnx.export = export
"""

KILL_AFTER_FIRST_RENAME = """
import os, signal
original = os.replace
def replace(source, target, *args, **kwargs):
    original(source, target, *args, **kwargs)
    if str(target).endswith("m.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""


@pytest.mark.slow
def test_an_export_killed_while_writing_leaves_the_earlier_set_and_the_next_clears_its_litter(
    two_trials, earlier_set, tmp_path
):
    """C1, C2: kill -9 of an export to the same ``--out`` after its .pt was written left trial 0's .pt beside
    trial 1's .onnx and .ts; its ``.m.onnx.<pid>-<hex>.partial`` stayed for good."""
    out, earlier = earlier_set
    args = ("export", "--study-name", "smoke", "--trial", "0", *FORMATS, "--out", str(out / "m.pt"))
    killed = run_cli(*args, cwd=two_trials, pythonpath=killing(tmp_path, KILL_DURING_ONNX.format(signal="SIGKILL")))
    assert killed.returncode == -9, killed.stderr
    assert assert_one_export(out, earlier) == "earlier" and set(digests(out)) > set(earlier)  # and its litter
    again = run_cli(*args, cwd=two_trials)
    assert again.returncode == 0, again.stderr
    assert "export: removed what a killed export left: .m." in again.stderr
    assert assert_one_export(out, earlier, trial=0) == "later" and sorted(digests(out)) == ["m.onnx", "m.pt", "m.ts"]


@pytest.mark.slow
def test_an_export_killed_between_its_renames_leaves_one_trials_files(two_trials, earlier_set, tmp_path):
    """C1: the earlier set's files go before the first of the new ones comes: a kill -9 between two renames leaves
    some of the new set alone."""
    out, earlier = earlier_set
    args = ("export", "--study-name", "smoke", "--trial", "0", *FORMATS, "--out", str(out / "m.pt"))
    killed = run_cli(*args, cwd=two_trials, pythonpath=killing(tmp_path, KILL_AFTER_FIRST_RENAME))
    assert killed.returncode == -9, killed.stderr
    assert assert_one_export(out, earlier, trial=0) == "later"
    assert [name for name in digests(out) if not name.startswith(".")] == ["m.pt"]


def interrupted_line(stderr: str) -> bool:
    """Whether ``stderr`` is export's one line for an interrupt (and nothing else)."""
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("ranksearch: export interrupted; ") and "never a mix" in lines[0]


@pytest.mark.slow
def test_sigterm_during_an_export_says_so_and_leaves_the_earlier_set(two_trials, earlier_set, tmp_path):
    """C1: SIGTERM exited 143 silently, after the new .pt had replaced the earlier one."""
    out, earlier = earlier_set
    killed = run_cli("export", "--study-name", "smoke", "--trial", "0", *FORMATS, "--out", str(out / "m.pt"),
                     cwd=two_trials, pythonpath=killing(tmp_path, KILL_DURING_ONNX.format(signal="SIGTERM")))
    assert killed.returncode == 143 and interrupted_line(killed.stderr), killed.stderr
    assert digests(out) == earlier  # whole, and no temporaries


@pytest.mark.slow
def test_ctrl_c_during_an_export_says_exports_own_message(two_trials, earlier_set, monkeypatch):
    """C1: Ctrl-C printed `run`'s "finished trials are saved: run again to resume"."""
    from ranksearch.deliver import export

    def interrupted(*args, **kwargs):
        def write(partial):
            partial.write_bytes(b"half")
            raise KeyboardInterrupt

        return write

    monkeypatch.setattr(export, "torchscript_writer", interrupted, raising=False)  # (save_torchscript before)
    out, earlier = earlier_set
    result = run_cli("export", "--study-name", "smoke", "--trial", "0", *FORMATS, "--out", str(out / "m.pt"),
                     cwd=two_trials)  # fmt: skip
    assert result.returncode == 130 and interrupted_line(result.stderr), result.stderr
    assert "finished trials are saved" not in result.stderr and digests(out) == earlier


@pytest.mark.slow
def test_a_diverging_refine_is_one_line(two_trials, tmp_path, monkeypatch):
    """T: a refine whose loss became NaN ended in a ``TrainingDiverged`` traceback."""
    from ranksearch.deliver import export
    from ranksearch.train.loops import TrainingDiverged

    def diverging(*args, **kwargs):
        raise TrainingDiverged("training loss became nan (try a lower learning rate)")

    monkeypatch.setattr(export, "refine", diverging)
    result = run_cli("export", "--study-name", "smoke", "--trial", "0", "--finetune-epochs", "1", "--refine-lr", "9",
                     "--out", str(tmp_path / "d.pt"), cwd=two_trials)  # fmt: skip
    one_line_error(result, "the refine diverged (training loss became nan")
    assert "pass a --refine-lr below 9" in result.stderr and not (tmp_path / "d.pt").exists()


@pytest.mark.slow
def test_another_format_at_the_name_is_refused_before_any_work(two_trials, earlier_set):
    """C1: an export of the .pt alone to the name of an earlier .pt, .onnx and .ts left the .onnx and .ts, of
    another trial, beside it."""
    out, earlier = earlier_set
    result = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", str(out / "m.pt"), cwd=two_trials)
    one_line_error(result, "(an earlier export's?) would stay beside this export's files, of another trial; add "
                   "onnx,torchscript to --format, or remove it")  # fmt: skip
    assert digests(out) == earlier
