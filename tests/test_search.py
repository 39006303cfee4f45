"""End to end on a tiny ImageFolder with the smoke config: the study, its attrs, resuming, failures."""

import optuna
import pytest
import yaml

from conftest import SMOKE_CONFIG, run_cli
from ranksearch import __version__
from ranksearch.models import RANK_STEPS

pytestmark = pytest.mark.slow
MODULES = ["block1", "block2", "block3", "block4", "block5"]
TRIAL_ATTRS = {
    "ranks", "params", "macs_ratio", "params_ratio", "seed",
    "decompose_s", "finetune_s", "eval_s", "count_s", "device", "device_name", "eval_dtype", "torch_version",
}  # fmt: skip


def smoke_run(cwd, data_dir, *extra):
    return run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(data_dir), *extra, cwd=cwd)


def load(cwd, name="smoke"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'studies' / f'{name}.db'}")


def test_search_writes_a_resumable_sqlite_study(tmp_path, tiny_imagefolder):
    first = smoke_run(tmp_path, tiny_imagefolder, "--ranks", "8/32,8/32,8/32,8/32,8/32")
    assert first.returncode == 0, first.stderr
    assert "Pareto front" in first.stdout and first.stdout.count("trial ") >= 3
    study = load(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_accuracy", "macs"]
    trials = study.trials
    assert trials[0].user_attrs["ranks"] == "8/8/8/8/8 /32"
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[0].params == {f"rank_{m}": 0.25 for m in MODULES}  # the enqueued ranks go first
    for trial in trials:
        assert sorted(trial.params) == sorted(f"rank_{m}" for m in MODULES)
        assert all(float(v * RANK_STEPS).is_integer() and 1 / 32 <= v <= 1 for v in trial.params.values())
        assert TRIAL_ATTRS <= set(trial.user_attrs) and "val_accuracy" not in trial.user_attrs
        assert trial.user_attrs["macs"] == trial.values[1]  # every cost is an attr, whatever the objectives
        assert 0 <= trial.values[0] <= 1 and trial.values[1] > 0 and len(trial.system_attrs["conv_ranks"]) == 13
        steps = [str(round(trial.params[f"rank_{m}"] * 32)) for m in MODULES]
        assert trial.user_attrs["ranks"] == "/".join(steps) + " /32"
        assert (trial.user_attrs["device"], trial.user_attrs["eval_dtype"]) == ("cpu", "fp32")
    baseline = study.user_attrs["baseline"]
    assert set(baseline) == {"val_accuracy", "test_accuracy", "macs", "params"}
    assert trials[0].user_attrs["macs_ratio"] == pytest.approx(trials[0].values[1] / baseline["macs"])
    assert study.user_attrs["config"]["width"] == 0.0625 and study.user_attrs["ranksearch_version"] == __version__
    assert set(study.user_attrs["data"]) == {"source", "fingerprint", "split"}

    baselines = list((tmp_path / "studies" / "baselines").glob("*.pt"))
    stamp = baselines[0].stat().st_mtime_ns
    second = smoke_run(tmp_path, tiny_imagefolder, "--trials", "2")
    assert second.returncode == 0, second.stderr
    assert "(cached)" in second.stderr and baselines[0].stat().st_mtime_ns == stamp
    assert len(load(tmp_path).trials) == 5  # resumed: 3 + 2


def test_other_config_is_refused_and_the_study_left_intact(tmp_path, tiny_imagefolder):
    assert smoke_run(tmp_path, tiny_imagefolder, "--trials", "1").returncode == 0
    changed = smoke_run(tmp_path, tiny_imagefolder, "--finetune-steps", "9")
    assert changed.returncode == 2 and "another config" in changed.stderr and "finetune_steps" in changed.stderr
    assert len(load(tmp_path).trials) == 1


def diverge(*args, **kwargs):
    """A fine-tune whose loss became NaN (a finetune_lr of 1e12 did it before rates were bounded to 10)."""
    from ranksearch.train.loops import TrainingDiverged

    raise TrainingDiverged("training loss became nan (try a lower learning rate)")


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, tiny_imagefolder, monkeypatch):
    monkeypatch.setattr("ranksearch.search.trial.finetune", diverge)
    config = yaml.safe_load(SMOKE_CONFIG.read_text()) | {"study_name": "diverges"}
    (tmp_path / "diverges.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", "--config", "diverges.yaml", "--data-dir", str(tiny_imagefolder), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    trials = load(tmp_path, "diverges").trials
    assert len(trials) == 3  # every trial ran, none stopped the study
    assert all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert all("loss became" in t.user_attrs["fail_reason"] for t in trials)
