"""The decomposition registry: CP and SVD beside Tucker-2, their rank rules, the per-layer record, and rebuilding
files from every release."""

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from torch import nn

from conftest import SMOKE_CONFIG, run_cli
from ranksearch import load_model
from ranksearch.decompose import (
    CPConv,
    DecompositionError,
    SVDLayer,
    Tucker2Conv,
    cp_factors,
    cp_rank,
    decompose,
    decomposed_from_state_dict,
    method_for,
    svd_rank,
)
from ranksearch.decompose.cp import cp_weight
from ranksearch.models import build_model, rank_modules, set_ranks
from ranksearch.models.measure import count_macs, flop_counter_macs

FIXTURES = Path(__file__).parent / "data"


def _random_cp(shape: tuple[int, ...], rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return cp_weight([torch.randn(d, rank, generator=generator) for d in shape])


# ----- CP --------------------------------------------------------------------------------------------------------


def test_cp_recovers_a_weight_of_known_cp_rank():
    weight = _random_cp((16, 12, 3, 3), rank=5)
    factors = cp_factors(weight, 5, n_iter_max=300)
    assert [tuple(f.shape) for f in factors] == [(16, 5), (12, 5), (3, 5), (3, 5)]
    assert torch.linalg.norm(cp_weight(factors) - weight) / torch.linalg.norm(weight) < 1e-4


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, True)])
def test_cp_layer_computes_the_conv_of_its_factors(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    layer = CPConv.factorized(conv, 0.25, "conv", _options())
    factors = [
        layer.last.weight[:, :, 0, 0],  # (Cout, R)
        layer.first.weight[:, :, 0, 0].T,  # (Cin, R)
        layer.vertical.weight[:, 0, :, 0].T,  # (kh, R)
        layer.horizontal.weight[:, 0, 0, :].T,  # (kw, R)
    ]
    x = torch.randn(2, 12, 11, 11)
    expected = nn.functional.conv2d(x, cp_weight(factors), conv.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert layer.vertical.groups == layer.integer_rank() == cp_rank(0.25, conv)


def _options():
    from ranksearch.decompose import FactorOptions

    return FactorOptions(cp_iters=300)


def test_cp_rank_is_a_fraction_of_the_break_even_rank():
    conv = nn.Conv2d(64, 128, 3, padding=1)  # 73,728 MACs per pixel; 64 + 3 + 3 + 128 = 198 per component
    assert cp_rank(1.0, conv) == 373 and cp_rank(8 / 32, conv) == 93 and cp_rank(1 / 1000, conv) == 1
    assert CPConv.macs_per_pixel(conv, (93,)) == 93 * 198
    assert CPConv.cheaper(conv, 31 / 32) and not CPConv.cheaper(conv, 1.0)  # r = 1 keeps the conv


def test_a_diverging_cp_is_a_decomposition_error_naming_the_layer():
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(DecompositionError, match="block9.0 at CP rank"):
        CPConv.factorized(conv, 0.5, "block9.0", _options())


# ----- SVD -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), nn.Conv2d(12, 7, 1, stride=2), nn.Conv2d(12, 7, 1, bias=False)])
def test_full_rank_svd_reproduces_the_layer(layer):
    torch.manual_seed(0)
    new = SVDLayer.factorized(layer, 1.0, "layer", _options())
    x = torch.randn(3, 12) if isinstance(layer, nn.Linear) else torch.randn(3, 12, 9, 9)
    torch.testing.assert_close(new(x), layer(x), atol=1e-5, rtol=1e-5)
    assert new.integer_rank() == 7 == svd_rank(1.0, 12, 7)


def test_svd_is_the_best_low_rank_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(20, 30, bias=False)
    new = SVDLayer.factorized(layer, 4 / 20, "layer", _options())
    product = new.last.weight @ new.first.weight
    singular = torch.linalg.svdvals(layer.weight.detach())
    expected = singular[4:].square().sum().sqrt()  # Eckart-Young: the error is the discarded singular values
    torch.testing.assert_close(torch.linalg.norm(product - layer.weight), expected, atol=1e-5, rtol=1e-4)


def test_methods_by_layer_kind():
    assert method_for(nn.Conv2d(4, 4, 3)) is Tucker2Conv and method_for(nn.Conv2d(4, 4, 3), "cp") is CPConv
    assert method_for(nn.Conv2d(4, 4, 1)) is SVDLayer and method_for(nn.Linear(4, 4), "cp") is SVDLayer
    assert method_for(nn.Conv2d(4, 4, 3, groups=4)) is None and method_for(nn.BatchNorm2d(4)) is None
    with pytest.raises(ValueError, match="unknown decomposition 'svd'"):
        method_for(nn.Conv2d(4, 4, 3), "svd")


# ----- models: every method, MACs, the per-layer record ---------------------------------------------------------


@pytest.mark.parametrize("name,width", [("vgg16", 0.125), ("resnet20", 0.5)])
@pytest.mark.parametrize("decomposition", ["tucker2", "cp"])
def test_a_model_decomposed_by_any_method_counts_and_rebuilds_from_its_state_dict(name, width, decomposition):
    torch.manual_seed(0)
    model = build_model(name, width=width, svd_layers=True).eval()
    modules = list(rank_modules(model))
    assert modules[-1] in ("classifier", "fc")  # the SVD switch ranks the linear layer
    set_ranks(model, [4 / 32] * len(modules))
    decomposed = decompose(model, decomposition=decomposition).eval()
    kinds = {type(layer) for layer in decomposed.modules()}
    assert {SVDLayer, {"tucker2": Tucker2Conv, "cp": CPConv}[decomposition]} <= kinds
    macs = count_macs(decomposed)[0]
    assert macs == flop_counter_macs(decomposed, (1, 3, 32, 32)) and macs < count_macs(model)[0] / 4
    rebuilt = decomposed_from_state_dict(build_model(name, width=width), decomposed.state_dict()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), decomposed(x))
    records = {k: int(v) for k, v in decomposed.state_dict().items() if k.endswith(".decomposition")}
    assert set(records.values()) == {SVDLayer.code, {"tucker2": 1, "cp": 2}[decomposition]}


def test_an_unknown_decomposition_record_asks_for_an_upgrade():
    model = set_ranks(build_model("vgg16", width=0.125), [4 / 32] * 5)
    state = decompose(model, factorize=False).state_dict()
    state["features.block1.0.decomposition"] = torch.tensor(99)
    with pytest.raises(ValueError, match="decomposition code 99, unknown to this version: upgrade ranksearch"):
        decomposed_from_state_dict(build_model("vgg16", width=0.125), state)


def test_a_resnet20_file_written_by_0_4_0_loads_and_gives_its_recorded_outputs():
    model = load_model(FIXTURES / "export-v2.pt")  # Tucker-2 layers without a decomposition record
    reference = torch.load(FIXTURES / "export-v2-reference.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(reference["images"]), reference["logits"])
    assert isinstance(model.stage1[0].conv1, Tucker2Conv) and isinstance(model.stem[0], nn.Conv2d)


# ----- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vgg16", "resnet20"])
def test_cp_with_svd_layers_searches_and_exports(tmp_path, tiny_imagefolder, model):
    result = run_cli(
        "run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--model", model,
        "--decomposition", "cp", "--svd-layers", "--study-name", "cp", "--trials", "2", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="cp", storage=f"sqlite:///{tmp_path / 'studies' / 'cp.db'}")
    assert study.user_attrs["config"]["decomposition"] == "cp" and study.user_attrs["config"]["svd_layers"]
    assert any(name.endswith(("classifier", "fc")) for name in study.trials[0].params)
    out = tmp_path / "best.pt"
    exported = run_cli("export", "--study-name", "cp", "--trial", "0", "--out", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    loaded = load_model(out)
    assert any(isinstance(layer, CPConv) for layer in loaded.modules())
    assert count_macs(loaded)[0] == study.trials[0].user_attrs["macs"]


@pytest.mark.slow
def test_a_trial_whose_cp_fails_is_failed_with_the_reason_and_the_study_goes_on(workdir, tiny_imagefolder):
    tmp_path = workdir  # the smoke baseline is cached there
    plugin = tmp_path / "sitecustomize.py"  # the run's first CP-ALS diverges, in the CLI's own process
    plugin.write_text(
        "import importlib\n"
        "cp = importlib.import_module('ranksearch.decompose.cp')  # ranksearch.decompose is also the function\n"
        "original, calls = cp.als, []\n"
        "def diverging(w, factors, *args):\n"
        "    calls.append(1)\n"
        "    factors = original(w, factors, *args)\n"
        "    return [f * float('inf') for f in factors] if len(calls) == 1 else factors\n"
        "cp.als = diverging\n"
    )
    config = yaml.safe_load(SMOKE_CONFIG.read_text()) | {"decomposition": "cp", "study_name": "cpfail"}
    (tmp_path / "cp.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", "--config", "cp.yaml", "--data-dir", str(tiny_imagefolder), "--trials", "2",
                     "--ranks", "4/32,4/32,4/32,4/32,4/32", cwd=tmp_path, pythonpath=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="cpfail", storage=f"sqlite:///{tmp_path / 'studies' / 'cpfail.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "DecompositionError: features.block1.0 at CP rank" in trials[0].user_attrs["fail_reason"]


# ----- the SVD switch: modules and the shared baseline ------------------------------------------------------------


def test_the_svd_switch_gives_linear_and_pointwise_layers_modules_of_their_own():
    assert list(rank_modules(build_model("vgg16", width=0.125, svd_layers=True)))[-2:] == ["block5", "classifier"]
    mobilenet = list(rank_modules(build_model("torchvision:mobilenet_v2", svd_layers=True)))
    assert mobilenet[:2] == ["features.0", "features.1"] and mobilenet[-1] == "classifier" and len(mobilenet) == 20
    assert list(rank_modules(build_model("torchvision:mobilenet_v2"))) == ["features.0"]  # its 3x3 stem alone


def test_one_baseline_checkpoint_serves_configs_with_and_without_the_svd_switch():
    from ranksearch.train.baseline import _as_ranked_by

    plain, switched = build_model("resnet20", width=0.25), build_model("resnet20", width=0.25, svd_layers=True)
    for saved, into in ((plain, switched), (switched, plain)):
        into.load_state_dict(_as_ranked_by(into, saved.state_dict()))  # strict: exactly the model's keys
    assert float(switched.fc.rank) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--decomposition", "cp"], ["--decompose-method", "hooi"]], ids=["cp", "hooi"])
def test_a_cp_or_hooi_trial_without_kept_weights_re_exports_as_it_ran(flags, workdir, tiny_imagefolder):
    """Re-running a trial's fine-tune (its weights were not kept) rebuilds the model it measured, and, as the trial
    did, computes no Tucker-2 channel bases: CP and HOOI factor the weights themselves."""
    from ranksearch.study.weights import WeightsStore

    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                  "--ranks", "8/32,8/32,8/32,8/32,8/32", *flags, cwd=workdir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    (trial,) = study.trials
    store = WeightsStore(study.user_attrs["weights_dir"])
    kept = store.load(trial)
    store.store.remove(trial.user_attrs["weights_artifact_id"])  # as if the trial had left the front
    out = workdir / "rerun.pt"
    export = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", str(out), cwd=workdir)
    assert export.returncode == 0 and "re-run from seed" in export.stdout, export.stderr
    rebuilt = load_model(out).state_dict()
    for key, value in kept.items():
        torch.testing.assert_close(rebuilt[key], value, atol=1e-6, rtol=1e-5)
    assert not list((workdir / "studies" / "baselines").glob("*.bases.pt"))  # no bases the trial never used
