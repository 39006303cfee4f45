"""User mistakes through the real CLI: exit code 2, one line on stderr, no traceback, no study harmed."""

import random

import optuna
import pytest

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.cli import main

SMOKE = ("--config", str(SMOKE_CONFIG))


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("ranksearch")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args,fragments",
    [
        (("run", "--trails", "3"), ("unrecognized arguments: --trails",)),
        (("run", *SMOKE, "--trials", "0"), ("--trials must be at least 1",)),
        (("run", *SMOKE, "--trials", "many"), ("--trials", "invalid int")),
        (("run", *SMOKE, "--ranks", "0.3,0.25,0.25,0.25,0.25"), ("off the grid", "k/32")),
        (("run", *SMOKE, "--ranks", "8/32,8/32"), ("--ranks needs 5 values",)),
        (("run", *SMOKE, "--ranks", "eight"), ("comma-separated ranks",)),
        (("run", "--config", "no/such/config.yaml"), ("cannot read config",)),
        (("run", *SMOKE, "--device", "tpu"), ("device must be one of",)),
        (
            ("pretrain", *SMOKE, "--data-dir", "no-data-here"),
            ("--data-dir", "train/ and test/", "cifar-10-batches-py"),
        ),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, fragments):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


def test_unknown_config_key(tmp_path):
    (tmp_path / "c.yaml").write_text("width: 0.25\nfinetune_stpes: 3\n")
    assert_one_line_error(run_cli("run", "--config", "c.yaml", cwd=tmp_path), "unknown config key", "finetune_stpes")


def test_missing_data_creates_nothing(tmp_path):
    result = run_cli("run", *SMOKE, "--data-dir", str(tmp_path / "void"), cwd=tmp_path)
    assert_one_line_error(result, "no dataset found", "--data-dir")
    assert list(tmp_path.iterdir()) == []  # no study, no baseline folder


@pytest.mark.parametrize("url", ["notadb://nowhere", "sqlite:////no/such/folder/x.db"])
def test_unreadable_storage_url(tmp_path, tiny_imagefolder, url):
    result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--storage", url, cwd=tmp_path)
    assert_one_line_error(result, "cannot open storage", "--storage")


def test_study_with_other_directions_is_refused_and_left_intact(tmp_path, tiny_imagefolder):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    other = optuna.create_study(storage=url, study_name="smoke", directions=["minimize", "minimize"])
    other.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[1.0, 2.0]))
    result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--storage", url, cwd=tmp_path)
    assert_one_line_error(result, "exists with directions", "--study-name")
    again = optuna.load_study(study_name="smoke", storage=url)
    assert len(again.trials) == 1 and again.user_attrs == {}


def test_help_says_trials_add_to_the_study(tmp_path):
    result = run_cli("run", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "ADD" in result.stdout and "resumes" in result.stdout


@pytest.mark.parametrize(
    "args,fragments",
    [
        (("run", *SMOKE, "--width", "inf"), ("width must be a finite number, got inf",)),
        (("run", *SMOKE, "--seed", "-1"), ("seed must be in [0, 4294967295], got -1",)),
        (("pretrain", *SMOKE, "--seed", "1099511627776"), ("seed must be in [0, 4294967295], got 1099511627776",)),
        (("run", *SMOKE, "--ranks", "1e400,1e400,1e400,1e400,1e400"), ("--ranks '1e400,", "comma-separated ranks")),
        (("dashboard", "--study-name", "s", "--port", "70000"), ("--port must be in 0..65535", "got 70000")),
        (("dashboard", "--study-name", "s", "--port", "-1"), ("--port must be in 0..65535", "got -1")),
    ],
)
def test_values_out_of_range_exit_2_with_one_line(tmp_path, args, fragments):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


@pytest.mark.parametrize(
    "content,fragments",
    [
        (random.Random(0).randbytes(300), ("config c.yaml is not UTF-8 text", "pass a YAML file")),
        (b"finetune_lr: .inf\n", ("finetune_lr must be a finite number, got inf",)),
    ],
)
def test_bad_config_file_exits_2_with_one_line(tmp_path, content, fragments):
    (tmp_path / "c.yaml").write_bytes(content)
    assert_one_line_error(run_cli("run", "--config", "c.yaml", cwd=tmp_path), *fragments)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--width", "nan"), "width must be a finite number, got nan"),
        (("--width", "0"), "width must be in (0, 16], got 0.0"),
        (("--width", "-1"), "width must be in (0, 16], got -1.0"),
        (("--width", "17"), "width must be in (0, 16], got 17.0"),
        (("--val-size", "99999999999999"), "val_size must be in [1, 2147483647]"),
        (("--ranks", "nan,nan,nan,nan,nan"), "comma-separated ranks"),
        (("--ranks", "inf,1,1,1,1"), "comma-separated ranks"),
        (("--ranks", "1/0,1,1,1,1"), "comma-separated ranks"),
    ],
)
def test_more_out_of_range_flags_in_process(capsys, args, fragment):
    assert main(["run", *SMOKE, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ranksearch: error: ") and err.count("\n") == 1 and fragment in err
