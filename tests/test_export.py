"""Export: picking a trial, rebuilding it exactly, the self-describing .pt, ONNX, clear errors."""

import dataclasses
import re
from pathlib import Path

import optuna
import pytest
import torch

from conftest import CLASSES, REPO, SMOKE_CONFIG, run_cli
from ranksearch import count_macs, load_model, vgg16_cifar
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.decompose import Tucker2Conv
from ranksearch.deliver.export import (
    BEFORE_FIELD_EXISTED,
    export_device,
    output_paths,
    pick_best,
    study_config,
    verify,
)
from ranksearch.deliver.load import CIFAR10_CLASSES, INPUT_SPEC
from ranksearch.models.measure import predict_correct
from ranksearch.study.config import RUN_CONTROL, Config
from ranksearch.study.storage import check_data
from ranksearch.study.weights import WeightsStore
from ranksearch.train.loops import evaluate
from ranksearch.utils.errors import UserError

DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)
FIXTURES = Path(__file__).parent / "data"
VERSION_1 = FIXTURES / "export-v1.pt"  # written by ranksearch 0.1.0: see make_export_v1.sh


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
    assert count_macs(model) == (trial.values[1], trial.user_attrs["params"])
    assert (payload["macs"], payload["params"]) == (trial.values[1], trial.user_attrs["params"])
    assert val_accuracy(model, tiny_imagefolder) == pytest.approx(trial.values[0], abs=0.001)
    assert payload["study_name"] == "smoke" and payload["config"]["width"] == 0.0625
    assert payload["file_version"] == 5 and (payload["device"], payload["eval_dtype"]) == ("cpu", "fp32")
    records = {int(v) for k, v in payload["state_dict"].items() if k.endswith(".decomposition")}
    assert records == {Tucker2Conv.code}  # each decomposed layer records its method
    assert payload["measured_with"]["device"] == "cpu"
    assert model.input_spec == payload["input"] == INPUT_SPEC and model.classes == payload["classes"] == CLASSES

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


# ----- files written by earlier and later releases -----------------------------------------------------------------


def test_a_version_1_file_from_0_1_0_loads_and_gives_its_recorded_outputs():
    model = load_model(VERSION_1)
    reference = torch.load(FIXTURES / "export-v1-reference.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(reference["images"]), reference["logits"])
    assert isinstance(model.features.block1[0], Tucker2Conv) and isinstance(model.features.block5[0], torch.nn.Conv2d)
    assert model.input_spec == INPUT_SPEC and model.classes == CIFAR10_CLASSES  # what 0.1.0 did not record


def _payload(**changes) -> dict:
    payload = torch.load(VERSION_1, weights_only=True)
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def _save(tmp_path, payload: dict) -> Path:
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    return path


def test_a_file_from_a_newer_release_asks_for_an_upgrade(tmp_path):
    path = _save(tmp_path, _payload(file_version=6, ranksearch_version="0.10.0"))
    with pytest.raises(UserError, match=r"written by ranksearch 0.10.0 \(file version 6\); upgrade ranksearch"):
        load_model(path)


def _state(change) -> dict:
    state = dict(torch.load(VERSION_1, weights_only=True)["state_dict"])
    change(state)
    return state


DAMAGED = {
    "no config": (_payload(config=None), r"\(config: missing or wrong\)"),
    "no state_dict": (_payload(state_dict=None), r"\(state_dict: missing or wrong\)"),
    "config not a dict": (_payload(config="vgg16"), r"\(config: missing or wrong\)"),
    "state_dict a list": (_payload(state_dict=[1, 2]), r"\(state_dict: missing or wrong\)"),
    "config without width": (_payload(config={"model": "vgg16", "num_classes": 10}), r"config \(model, num_classes"),
    "unknown model": (_payload(config={"model": "vgg99", "num_classes": 10, "width": 0.0625}), "unknown model"),
    "num_classes text": (_payload(config={"model": "vgg16", "num_classes": "10", "width": 0.0625}), "describes no"),
    "not tensors": (_payload(state_dict={"features.block1.0.rank": 1.0}), r"state_dict \(tensors\)"),
    "missing tensor": (_payload(state_dict=_state(lambda s: s.pop("classifier.bias"))), "missing 'classifier.bias'"),
    "wrong shape": (
        _payload(state_dict=_state(lambda s: s.update({"classifier.weight": torch.zeros(2, 2)}))),
        "wrong shape of 'classifier.weight'",
    ),
    "no rank buffers": (
        _payload(state_dict=_state(lambda s: [s.pop(k) for k in list(s) if k.endswith(".rank")])),
        "no rank buffer",
    ),
    "version text": (_payload(file_version="2"), r"damaged ranksearch export \(file_version '2'\)"),
    "version 2 without input": (_payload(file_version=2, classes=list(CLASSES)), r"\(input: missing or wrong\)"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_export_is_one_clear_line(tmp_path, name):
    payload, message = DAMAGED[name]
    with pytest.raises(UserError, match=message) as error:
        load_model(_save(tmp_path, payload))
    assert "\n" not in str(error.value) and re.search("export (it )?again$", str(error.value))


# ----- output files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out,formats,written", [
    ("x.onnx", ["onnx"], ["x.pt", "x.onnx"]),
    ("x.pt", ["pt", "onnx"], ["x.pt", "x.onnx"]),
    ("x", ["pt"], ["x.pt"]),
    ("x.ts", ["torchscript", "onnx"], ["x.pt", "x.ts", "x.onnx"]),
    ("model.v2", ["onnx"], ["model.v2.pt", "model.v2.onnx"]),
])  # fmt: skip
def test_each_format_takes_the_stem_of_out_and_the_pt_is_always_written(out, formats, written):
    assert [p.name for p in output_paths(Path("exports") / out, formats).values()] == written


def test_out_naming_a_format_that_is_not_asked_for_is_refused():
    with pytest.raises(UserError, match="names a onnx file but --format has no onnx"):
        output_paths(Path("x.onnx"), ["pt"])


@pytest.fixture
def hand_study(tmp_path) -> str:
    hand_built_study(0.90, storage=f"sqlite:///{tmp_path / 'hand.db'}")
    return f"sqlite:///{tmp_path / 'hand.db'}"


def test_out_in_a_read_only_folder_stops_before_any_work(tmp_path, hand_study):
    folder = tmp_path / "ro"
    folder.mkdir()
    for out in (folder / "x.pt", folder / "new" / "x.pt"):
        result = run_cli("export", "--study-name", "hand", "--storage", hand_study, "--trial", "0", "--out", str(out),
                         cwd=tmp_path, read_only=(folder,))  # fmt: skip
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "cannot write to the --out folder" in result.stderr and "Read-only file system" in result.stderr


def test_out_onto_a_folder_is_refused(tmp_path, hand_study):
    (tmp_path / "exports").mkdir()
    (tmp_path / "best.onnx").mkdir()
    for out, folder in (("exports", "exports"), ("best.pt", "best.onnx")):
        result = run_cli("export", "--study-name", "hand", "--storage", hand_study, "--trial", "0", "--format",
                         "pt,onnx", "--out", out, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert f"--out {folder} is a folder; give a file name, such as {folder}/best.pt" in result.stderr


def test_report_into_a_read_only_place_is_one_line(tmp_path, hand_study):
    folder = tmp_path / "ro"
    folder.mkdir()
    (tmp_path / "file").write_text("")
    for out in (folder / "report", tmp_path / "file"):
        result = run_cli("report", "--study-name", "hand", "--storage", hand_study, "--out", str(out), cwd=tmp_path,
                         read_only=(folder,))  # fmt: skip
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("ranksearch: error:") and str(out) in result.stderr
    assert not (folder / "report").exists()


# ----- the study's config, data and device -------------------------------------------------------------------------

# The search fields of the first release's Config (git show 6551cf1:ranksearch/config.py).
FIRST_RELEASE_FIELDS = {
    "model", "width", "num_classes", "val_size", "split_seed", "batch_size", "eval_batch_size", "pretrain_epochs",
    "pretrain_lr", "momentum", "weight_decay", "label_smoothing", "finetune_steps", "finetune_lr",
    "finetune_schedule", "rank_min", "rank_max", "sampler", "seed",
}  # fmt: skip


def _study_with_config(fields: dict) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="old")
    study.set_user_attr("config", fields)
    study.set_user_attr("baseline", {"val_accuracy": 0.9, "test_accuracy": 0.9, "macs": 1, "params": 1})
    return study


def test_a_study_from_the_first_release_gets_the_settings_it_was_run_with():
    fields = {k: v for k, v in dataclasses.asdict(Config(width=0.25)).items() if k in FIRST_RELEASE_FIELDS}
    config = study_config(_study_with_config(fields))
    # TensorLy's partial_tucker every trial, plain fine-tune: as the first release ran it
    assert config.decompose_method == "hooi" and config.refine_iters == 0
    assert config.distill_weight == 0 and config.compile is False
    assert config.width == 0.25


def test_every_field_added_since_the_first_release_has_its_old_value():
    search_fields = {f.name for f in dataclasses.fields(Config)} - RUN_CONTROL
    assert search_fields - FIRST_RELEASE_FIELDS == set(BEFORE_FIELD_EXISTED)


def test_a_study_with_config_fields_from_a_newer_release_asks_for_an_upgrade():
    study = _study_with_config({"model": "vgg16", "prune_ratio": 0.5})
    study.set_user_attr("ranksearch_version", "0.10.0")
    with pytest.raises(UserError, match=r"made by ranksearch 0.10.0 with config fields .*\(prune_ratio\); upgrade"):
        study_config(study)


def _trial(**attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(params={}, distributions={}, values=[0.5, 100.0], user_attrs=attrs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_cuda_trial_without_a_gpu_asks_for_device_cpu():
    with pytest.raises(UserError, match="ran on cuda but no CUDA GPU is visible; pass --device cpu.*may then differ"):
        export_device(_trial(device="cuda"), None)
    assert export_device(_trial(device="cuda"), "cpu") == torch.device("cpu")


def test_export_runs_where_the_trial_ran_unless_told():
    assert export_device(_trial(device="cpu"), None) == torch.device("cpu")
    assert export_device(_trial(), None).type == ("cuda" if torch.cuda.is_available() else "cpu")  # 0.1.0: auto
    with pytest.raises(UserError, match="--device 'gpu': choose auto, cpu or cuda"):
        export_device(_trial(), "gpu")


@pytest.fixture(scope="module")
def tiny_data(tiny_imagefolder) -> DeviceData:
    return DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))


def test_export_refuses_data_other_than_the_studys(tiny_data):
    study = _study_with_config({})
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0]))
    check_data(study, tiny_data.identity)  # a 0.1.0 study recorded no data: nothing to check
    study.set_user_attr("data", {**tiny_data.identity, "fingerprint": "other"})
    with pytest.raises(UserError, match=r"study 'old' was run on other data \(fingerprint: other -> "):
        check_data(study, tiny_data.identity)
    study.set_user_attr("data", tiny_data.identity)
    check_data(study, tiny_data.identity)


def test_verify_reads_val_accuracy_and_macs_from_the_trials_values(tiny_data):
    model, config = vgg16_cifar(width=0.0625), Config(eval_batch_size=64)
    accuracy, (macs, params) = evaluate(model, tiny_data, "val", 64), count_macs(model)
    trial = optuna.trial.create_trial(values=[accuracy, float(macs)], user_attrs={"params": params})  # 0.2.0 attrs
    assert verify(model, trial, config, tiny_data) == accuracy
    fewer = optuna.trial.create_trial(values=[accuracy, float(macs - 1)], user_attrs={"params": params})
    with pytest.raises(UserError, match="MACs"):
        verify(model, fewer, config, tiny_data)


def test_reading_a_trials_weights_creates_no_folder(tmp_path):
    assert WeightsStore(tmp_path / "gone").load(_trial(weights_artifact_id="abc")) is None
    assert not (tmp_path / "gone").exists()


# ----- using an export ---------------------------------------------------------------------------------------------


def readme_example() -> str:
    """The "Load and predict" example of README.md."""
    section = (REPO / "README.md").read_text().split("### Load and predict", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_reproduces_the_recorded_test_accuracy_from_image_files(
    smoke_study, tiny_imagefolder, tiny_data
):
    cwd, _ = smoke_study
    result = run_cli("export", "--study-name", "smoke", "--trial", "best", "--max-drop", "100", "--format", "onnx",
                     "--out", "named/best.onnx", cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (cwd / "named").iterdir()) == ["best.onnx", "best.pt"]
    code = readme_example()
    paths = 'EXPORT, TEST_DIR = "exports/best.pt", "data/cifar10-jpeg/test"'
    assert paths in code
    namespace: dict = {}
    exec(code.replace(paths, f"EXPORT, TEST_DIR = {str(cwd / 'named' / 'best.pt')!r}, "
                             f"{str(tiny_imagefolder / 'test')!r}"), namespace)  # fmt: skip
    recorded = torch.load(cwd / "named" / "best.pt", weights_only=True)["test_accuracy"]
    assert namespace["accuracy"] == pytest.approx(recorded, abs=1e-12)
    test = tiny_data.splits["test"]  # what the export measured: the same images, labels and normalization
    torch.testing.assert_close(namespace["images"], tiny_data.normalize(test.images))
    assert torch.equal(namespace["labels"], test.labels)
