"""A run's study and baseline through the real CLI: they belong to one dataset, a failed start-up writes nothing,
an unwritable folder is reported before any work, and the exit code judges every trial the run ran."""

import shutil

import optuna
import pytest
import yaml
from test_cli import assert_one_line_error

from conftest import SMOKE_CONFIG, run_cli, write_imagefolder

pytestmark = pytest.mark.slow
SMOKE = ("--config", str(SMOKE_CONFIG))


def run(cwd, data_dir, *extra, read_only=()):
    return run_cli("run", *SMOKE, "--data-dir", str(data_dir), *extra, cwd=cwd, read_only=read_only)


def load(cwd, name="smoke") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'studies' / f'{name}.db'}")


def test_a_failed_start_writes_nothing_and_does_not_lock_the_config(tmp_path, tiny_imagefolder):
    typo = run(tmp_path, tmp_path / "typo", "--finetune-steps", "5")
    assert_one_line_error(typo, "no dataset found")
    assert list(tmp_path.iterdir()) == []  # no study, no empty folder
    corrected = run(tmp_path, tiny_imagefolder, "--trials", "1")
    assert corrected.returncode == 0, corrected.stderr


def test_a_study_without_trials_may_be_reconfigured(workdir, tiny_imagefolder):
    (workdir / "studies").mkdir(exist_ok=True)
    url = f"sqlite:///{workdir / 'studies' / 'smoke.db'}"
    empty = optuna.create_study(storage=url, study_name="smoke", directions=["maximize", "minimize"])
    empty.set_user_attr("config", {"finetune_steps": 5})
    result = run(workdir, tiny_imagefolder, "--trials", "1")
    assert result.returncode == 0, result.stderr
    study = load(workdir)
    assert len(study.trials) == 1 and study.user_attrs["config"]["finetune_steps"] == 3


def test_a_study_is_never_resumed_on_other_data(workdir, tiny_imagefolder, tmp_path_factory):
    assert run(workdir, tiny_imagefolder, "--trials", "1").returncode == 0
    recorded = load(workdir).user_attrs["data"]
    other = write_imagefolder(tmp_path_factory.mktemp("other") / "cifar", train_per_class=11)
    result = run(workdir, other, "--trials", "1")
    assert_one_line_error(result, "was run on other data", "fingerprint", str(tiny_imagefolder))
    study = load(workdir)
    assert len(study.trials) == 1 and study.user_attrs["data"] == recorded
    assert len(list((workdir / "studies" / "baselines").glob("*[0-9a-f].pt"))) == 1  # nothing pretrained for it


def test_a_baseline_is_reused_only_for_the_same_data(workdir, tiny_imagefolder, tmp_path_factory):
    same = run_cli("pretrain", *SMOKE, "--data-dir", str(tiny_imagefolder), cwd=workdir)
    assert "(cached)" in same.stderr
    other = write_imagefolder(tmp_path_factory.mktemp("other") / "cifar", train_per_class=11)
    result = run_cli("pretrain", *SMOKE, "--data-dir", str(other), cwd=workdir)
    assert result.returncode == 0 and "(cached)" not in result.stderr and "pretrained" in result.stderr
    assert len(list((workdir / "studies" / "baselines").glob("*[0-9a-f].pt"))) == 2


def test_a_study_made_by_another_version_is_not_resumed(workdir, tiny_imagefolder):
    assert run(workdir, tiny_imagefolder, "--trials", "1").returncode == 0
    load(workdir).set_user_attr("ranksearch_version", "0.1.0")
    assert_one_line_error(run(workdir, tiny_imagefolder, "--trials", "1"), "made by ranksearch 0.1.0")
    assert len(load(workdir).trials) == 1


def test_a_read_only_study_folder_is_one_line(workdir, tiny_imagefolder):
    assert run(workdir, tiny_imagefolder, "--trials", "1").returncode == 0
    result = run(workdir, tiny_imagefolder, "--trials", "1", read_only=(workdir / "studies",))
    assert_one_line_error(result, "cannot write to study folder", "studies")
    assert len(load(workdir).trials) == 1


def test_a_read_only_baseline_folder_is_reported_before_pretraining(tmp_path, tiny_imagefolder):
    (tmp_path / "studies" / "baselines").mkdir(parents=True)
    result = run(tmp_path, tiny_imagefolder, read_only=(tmp_path / "studies" / "baselines",))
    assert_one_line_error(result, "cannot write to baseline_dir")
    assert not (tmp_path / "studies" / "smoke.db").exists()


def test_missing_channel_bases_in_a_read_only_baseline_folder(workdir, tiny_imagefolder):
    for bases in (workdir / "studies" / "baselines").glob("*.bases.pt"):
        bases.unlink()
    result = run(workdir, tiny_imagefolder, "--trials", "1", read_only=(workdir / "studies" / "baselines",))
    assert result.returncode == 0, result.stderr
    assert "cannot cache the channel bases" in result.stderr and "Traceback" not in result.stderr


def test_a_read_only_data_folder_decodes_each_start(workdir, tiny_imagefolder):
    data = workdir / "data"
    shutil.copytree(tiny_imagefolder, data, ignore=shutil.ignore_patterns(".ranksearch-cache*"))
    result = run(workdir, data, "--trials", "1", read_only=(data,))
    assert result.returncode == 0, result.stderr
    assert "note: cannot write the decode cache" in result.stderr and "decoding each start" in result.stderr


def test_num_classes_other_than_the_class_folders(tmp_path, tiny_imagefolder):
    (tmp_path / "five.yaml").write_text(yaml.safe_dump(yaml.safe_load(SMOKE_CONFIG.read_text()) | {"num_classes": 5}))
    result = run_cli("run", "--config", "five.yaml", "--data-dir", str(tiny_imagefolder), cwd=tmp_path)
    assert_one_line_error(result, "num_classes is 5", "has 10 classes")
    assert list(tmp_path.iterdir()) == [tmp_path / "five.yaml"]


def test_a_corrupt_image_is_named(tmp_path):
    data = write_imagefolder(tmp_path / "cifar", train_per_class=4, test_per_class=1)
    (data / "train" / "class7" / "0002.jpg").write_bytes(b"")
    assert_one_line_error(run(tmp_path, data), "cannot be decoded", "class7/0002.jpg")


def test_the_exit_code_judges_the_enqueued_trials_too(workdir, tiny_imagefolder, monkeypatch):
    from test_search import diverge

    monkeypatch.setattr("ranksearch.search.trial.finetune", diverge)
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    (workdir / "diverges.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(
        "run", "--config", "diverges.yaml", "--data-dir", str(tiny_imagefolder), "--trials", "1",
        "--ranks", "8/32,8/32,8/32,8/32,8/32", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 1 and "all 1 trials failed" in result.stderr
    assert [t.state for t in load(workdir).trials] == [optuna.trial.TrialState.FAIL]
