"""Export: picking a trial, rebuilding it exactly, the self-describing .pt, ONNX, clear errors."""

import optuna
import pytest
import torch

from conftest import SMOKE_CONFIG, run_cli
from ranksearch import count_macs, load_model
from ranksearch.data import DeviceData, load_dataset
from ranksearch.errors import UserError
from ranksearch.export import pick_best
from ranksearch.measure import predict_correct
from ranksearch.weights import WeightsStore

DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)


def hand_built_study(baseline_val: float, storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name="hand")
    study.set_user_attr("baseline", {"val_accuracy": baseline_val, "test_accuracy": 0.0, "macs": 1000, "params": 1})
    for accuracy, macs in [(0.895, 100), (0.88, 50), (0.91, 200), (0.85, 20), (0.86, 150)]:
        trial = optuna.trial.create_trial(
            params={"rank_block1": 0.5}, distributions={"rank_block1": DIST}, values=[accuracy, macs],
            user_attrs={"macs_ratio": macs / 1000},
        )  # fmt: skip
        study.add_trial(trial)
    return study


@pytest.mark.parametrize("max_drop,picked,alternatives", [(1.0, 0, [2]), (5.0, 3, [1, 0, 2]), (0.0, 2, [])])
def test_best_is_the_cheapest_pareto_trial_within_the_drop(max_drop, picked, alternatives):
    pick = pick_best(hand_built_study(0.90), max_drop)
    assert pick.trial.number == picked
    assert [t.number for t in pick.alternatives] == alternatives


def test_no_qualifying_trial_lists_the_front():
    with pytest.raises(UserError, match="no Pareto trial is within 1.0 pp.*trial 3.*trial 2"):
        pick_best(hand_built_study(0.99), 1.0)


def test_cli_says_when_no_trial_qualifies_and_lists_the_front(tmp_path):
    hand_built_study(0.99, storage=f"sqlite:///{tmp_path / 'hand.db'}")
    result = run_cli("export", "--study-name", "hand", "--storage", f"sqlite:///{tmp_path / 'hand.db'}",
                     "--out", "x.pt", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "no Pareto trial is within 1.0 pp" in result.stderr
    assert all(f"trial {n}:" in result.stderr for n in (3, 1, 0, 2)) and not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, tiny_imagefolder):
    cwd = tmp_path_factory.mktemp("export")
    result = run_cli(
        "run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "4",
        "--ranks", "4/32,4/32,4/32,4/32,4/32", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{cwd / 'studies' / 'smoke.db'}")
    return cwd, study


def val_accuracy(model, data_dir) -> float:
    data = DeviceData(load_dataset(data_dir), val_size=20, split_seed=0, device=torch.device("cpu"))
    return predict_correct(model, data.eval_batches("val", 64))


@pytest.mark.slow
def test_exported_model_is_the_trials_model(smoke_study, tiny_imagefolder):
    cwd, study = smoke_study
    result = run_cli(
        "export", "--study-name", "smoke", "--trial", "best", "--max-drop", "100", "--format", "pt,onnx",
        "--out", "out/best.pt", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "picked trial" in result.stdout and (cwd / "out" / "best.onnx").is_file()
    payload = torch.load(cwd / "out" / "best.pt", weights_only=True)
    trial = study.trials[payload["trial_number"]]
    assert trial.number in {t.number for t in study.best_trials}
    model = load_model(cwd / "out" / "best.pt")
    kept = WeightsStore(study.user_attrs["weights_dir"]).load(trial)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())  # same weights as evaluated
    assert count_macs(model) == (trial.user_attrs["macs"], trial.user_attrs["params"])
    assert (payload["macs"], payload["params"]) == (trial.user_attrs["macs"], trial.user_attrs["params"])
    assert val_accuracy(model, tiny_imagefolder) == pytest.approx(trial.values[0], abs=0.001)
    assert payload["study_name"] == "smoke" and payload["config"]["width"] == 0.0625

    import onnxruntime

    images = torch.randn(3, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(cwd / "out" / "best.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(images), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_trial_without_kept_weights_is_rebuilt_by_rerunning_its_fine_tune(smoke_study, tmp_path):
    cwd, study = smoke_study
    trial = study.best_trials[0]
    store = WeightsStore(study.user_attrs["weights_dir"])
    kept = store.load(trial)
    store.store.remove(trial.user_attrs["weights_artifact_id"])  # as if the trial had been dominated
    out = tmp_path / "rerun.pt"
    result = run_cli("export", "--study-name", "smoke", "--trial", str(trial.number), "--out", str(out), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "re-run from seed" in result.stdout
    rebuilt = load_model(out).state_dict()
    for key, value in kept.items():
        torch.testing.assert_close(rebuilt[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_export_errors_are_one_line(smoke_study):
    cwd, _ = smoke_study
    cases = [
        (("--trial", "99", "--out", "x.pt"), "no complete trial 99"),
        (("--trial", "first", "--out", "x.pt"), "give a trial number or 'best'"),
        (("--format", "tflite", "--out", "x.pt"), "choose from pt, onnx, torchscript"),
    ]
    for args, message in cases:
        result = run_cli("export", "--study-name", "smoke", *args, cwd=cwd)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    missing = run_cli("export", "--study-name", "nope", "--out", "x.pt", cwd=cwd)
    assert missing.returncode == 2 and "no study" in missing.stderr
    assert not (cwd / "studies" / "nope.db").exists()


def test_load_model_refuses_foreign_truncated_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a ranksearch export"):
        load_model(foreign)
    truncated = tmp_path / "truncated.pt"
    torch.save({"kind": "ranksearch-model", "state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_model(truncated)
    with pytest.raises(UserError, match="no file"):
        load_model(tmp_path / "missing.pt")
