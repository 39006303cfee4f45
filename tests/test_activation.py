"""Data-aware factors (decompose_method: activation): the statistics, their cache, the math of each method, and runs
of every decomposition and model end to end."""

import importlib

import pytest
import torch
import yaml
from torch import nn

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.decompose import CPConv, FactorOptions, SVDLayer, Tucker2Conv, data_aware_bases, decompose
from ranksearch.decompose.activation import whitening
from ranksearch.decompose.statistics import cached_statistics, layer_statistics
from ranksearch.deliver.load import load_model
from ranksearch.models import attach_rank_buffers, build_model, rank_layers, set_ranks


def correlated_inputs(channels: int, seed: int = 0) -> torch.Tensor:
    """(64, channels, 12, 12) images whose channels are strongly correlated (a few directions carry the energy)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=generator) * torch.logspace(0, -2, channels)
    return torch.einsum("ij,njhw->nihw", mix, torch.randn(64, channels, 12, 12, generator=generator))


def moments(rows: torch.Tensor) -> torch.Tensor:
    """E[x x^T] over the positions of (N, C, H, W) or (N, C) activations."""
    rows = rows.transpose(0, 1).flatten(1).double() if rows.dim() == 4 else rows.T.double()
    return rows @ rows.T / rows.shape[1]


def output_error(layer: nn.Module, original: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x) - original(x)).norm() / original(x).norm())


def test_whitening_is_the_square_root_and_its_inverse():
    sigma = moments(correlated_inputs(8))
    s, s_inv = whitening(sigma)
    torch.testing.assert_close(s @ s, sigma, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s @ s_inv, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_dead_input_channel_keeps_the_whitening_finite():
    x = correlated_inputs(6)
    x[:, 2] = 0  # a channel a ReLU never lets through
    s, s_inv = whitening(moments(x))
    assert torch.isfinite(s_inv).all() and torch.isfinite(s).all()


def _conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(0)
    return attach_rank_buffers(nn.Conv2d(cin, cout, 3, padding=1, bias=bias))


@pytest.mark.parametrize("method", [Tucker2Conv, CPConv])
def test_data_aware_conv_factors_reproduce_the_outputs_better_than_weight_fits(method):
    conv, x = _conv(16, 24), correlated_inputs(16)
    outputs = moments(conv(x).detach() - conv.bias.detach().view(1, -1, 1, 1))
    basis = {"conv": method.data_aware_basis(conv, moments(x), outputs)}
    for rank in (0.5, 0.25):
        plain = output_error(method.factorized(conv, rank, "conv", FactorOptions("hosvd")), conv, x)
        aware = output_error(method.factorized(conv, rank, "conv", FactorOptions("activation", basis)), conv, x)
        assert aware < 0.8 * plain, (rank, aware, plain)


def test_full_rank_data_aware_tucker2_is_exact():
    conv, x = _conv(8, 12), correlated_inputs(8)
    basis = {"conv": Tucker2Conv.data_aware_basis(conv, moments(x), moments(conv(x).detach()))}
    layer = Tucker2Conv.factorized(conv, 1.0, "conv", FactorOptions("activation", basis))
    assert output_error(layer, conv, x) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "pointwise"])
def test_data_aware_svd_is_exact_at_full_rank_and_better_below(kind):
    torch.manual_seed(0)
    x = correlated_inputs(16)
    layer = nn.Linear(16, 20) if kind == "linear" else nn.Conv2d(16, 20, 1)
    if kind == "linear":
        x = x.permute(0, 2, 3, 1).reshape(-1, 16)
    basis = {"layer": SVDLayer.data_aware_basis(layer, moments(x), None)}
    full = SVDLayer.factorized(layer, 1.0, "layer", FactorOptions("activation", basis))
    assert output_error(full, layer, x) < 1e-5
    plain = output_error(SVDLayer.factorized(layer, 0.25, "layer", FactorOptions("hosvd")), layer, x)
    aware = output_error(SVDLayer.factorized(layer, 0.25, "layer", FactorOptions("activation", basis)), layer, x)
    assert aware < 0.5 * plain, (aware, plain)


def test_data_aware_factors_are_shaped_as_plain_ones_orthonormal_and_balanced():
    conv, x = _conv(16, 24), correlated_inputs(16)
    basis = {"conv": Tucker2Conv.data_aware_basis(conv, moments(x), moments(conv(x).detach()))}
    layer = Tucker2Conv.factorized(conv, 0.25, "conv", FactorOptions("activation", basis))
    for factor in (layer.first.weight[:, :, 0, 0], layer.last.weight[:, :, 0, 0].T):  # rows (R, C), orthonormal
        torch.testing.assert_close(factor @ factor.T, torch.eye(len(factor)), atol=1e-5, rtol=0)
    linear = nn.Linear(16, 20)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16)
    svd = SVDLayer.factorized(linear, 0.5, "l", FactorOptions("activation", {"l": SVDLayer.data_aware_basis(
        linear, moments(rows), None)}))  # fmt: skip
    first, last = svd.first.weight, svd.last.weight  # (R, Cin), (Cout, R): sqrt(s) V^T and U sqrt(s)
    torch.testing.assert_close(first @ first.T, last.T @ last, atol=1e-4, rtol=1e-4)  # both diag(s)
    assert (first @ first.T - torch.diag(torch.diagonal(first @ first.T))).abs().max() < 1e-4


def test_the_activation_method_needs_its_bases():
    with pytest.raises(ValueError, match="data-aware basis"):
        Tucker2Conv.factorized(_conv(8, 8), 0.5, "conv", FactorOptions("activation"))


# ----- statistics on real batches, and their cache ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tiny_imagefolder) -> DeviceData:
    return DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))


def test_layer_statistics_are_the_moments_of_each_layers_inputs_and_outputs(tiny_data):
    model = build_model("vgg16", width=0.0625).eval()
    statistics = layer_statistics(model, tiny_data, images=40)
    names = [name for name, _ in rank_layers(model)]
    assert list(statistics) == names
    first = model.get_submodule(names[0])
    seen = []  # the same images, in the same order: batches of 40 drawn from the statistics' seed
    batches = tiny_data.train_batches(40, torch.Generator().manual_seed(0))
    images = next(batches)[0]
    with torch.no_grad():
        seen = first(images)
    torch.testing.assert_close(statistics[names[0]].inputs, moments(images))
    torch.testing.assert_close(statistics[names[0]].outputs, moments(seen))


def test_statistics_are_cached_beside_the_baseline_and_remade_for_other_weights(tiny_data, tmp_path, monkeypatch):
    model, checkpoint = build_model("vgg16", width=0.0625), tmp_path / "baseline.pt"
    first = cached_statistics(model, checkpoint, tiny_data, images=16)
    assert (tmp_path / "baseline.activations.pt").is_file()

    def no_measuring(*args):
        raise AssertionError("measured again")

    statistics = importlib.import_module("ranksearch.decompose.statistics")  # ranksearch.decompose is the function
    monkeypatch.setattr(statistics, "layer_statistics", no_measuring)
    again = cached_statistics(model, checkpoint, tiny_data, images=16)
    name = next(iter(first))
    torch.testing.assert_close(again[name].inputs, first[name].inputs)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # other weights: the cache does not belong to them
    with pytest.raises(AssertionError, match="measured again"):
        cached_statistics(model, checkpoint, tiny_data, images=16)


@pytest.mark.parametrize("decomposition", ["tucker2", "cp"])
def test_a_data_aware_model_keeps_more_of_the_baselines_outputs(tiny_data, decomposition):
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.5, svd_layers=True).eval()
    statistics = layer_statistics(model, tiny_data, images=64)
    bases = data_aware_bases(model, statistics, decomposition)
    assert set(bases) == {name for name, _ in rank_layers(model)}
    images = next(tiny_data.train_batches(64, torch.Generator().manual_seed(1)))[0]
    ranked = set_ranks(model, [0.5] * len(statistics), space="layer")
    errors = {}
    for method in ("hosvd", "activation"):
        decomposed = decompose(ranked, method=method, bases=bases if method == "activation" else None,
                               decomposition=decomposition).eval()  # fmt: skip
        errors[method] = output_error(decomposed, ranked, images)
    assert errors["activation"] < errors["hosvd"], errors


# ----- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("model", "extra"), [("vgg16", []), ("resnet20", ["--decomposition", "cp", "--svd-layers"])])
def test_activation_runs_and_exports_for_every_decomposition_and_model(workdir, tiny_imagefolder, model, extra):
    tmp_path = workdir
    config = yaml.safe_load(SMOKE_CONFIG.read_text()) | {"decompose_method": "activation", "activation_images": 32}
    (tmp_path / "aware.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", "--config", "aware.yaml", "--data-dir", str(tiny_imagefolder), "--model", model,
                     *extra, "--study-name", "aware", "--trials", "2", "--ranks", ",".join(["8/32"] * 5),
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "activations: measuring layer statistics on 32 training images" in result.stderr
    assert list((tmp_path / "studies" / "baselines").glob("*.activations.pt"))
    out = tmp_path / "aware.pt"
    (weights,) = [p for p in (tmp_path / "studies").iterdir() if p.name == "aware-weights"]
    for kept in weights.rglob("*"):  # no kept weights: export re-runs the trial, through the cached statistics
        if kept.is_file():
            kept.unlink()
    exported = run_cli("export", "--study-name", "aware", "--trial", "0", "--out", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "fine-tune re-run" in exported.stdout
    assert "activations: measuring" not in exported.stderr  # read from the cache
    assert load_model(out) is not None
