"""Folding BatchNorm into the conv before it: the same outputs, no BatchNorm left, in the deployable exports too."""

import collections

import pytest
import torch
from torch import nn

from ranksearch.decompose import decompose
from ranksearch.deliver.export import save_onnx, save_torchscript
from ranksearch.models import build_model, set_ranks
from ranksearch.models.fold import fold_batchnorm


def with_trained_batchnorms(model: nn.Module) -> nn.Module:
    """``model`` with random running statistics and affine parameters in every BatchNorm, in training mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.running_mean.copy_(torch.randn(size, generator=generator))
                layer.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                layer.weight.copy_(torch.randn(size, generator=generator))
                layer.bias.copy_(torch.randn(size, generator=generator))
    return model.train()


def baseline() -> nn.Module:
    return with_trained_batchnorms(build_model("vgg16", width=0.25))


def decomposed() -> nn.Module:
    return with_trained_batchnorms(decompose(set_ranks(build_model("vgg16", width=0.25), [0.125] * 5)))


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(layer, nn.BatchNorm2d) for layer in model.modules())


@pytest.mark.parametrize("make", [baseline, decomposed])
def test_the_folded_model_computes_the_same_and_has_no_batchnorm(make):
    model = make()
    folded = fold_batchnorm(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert batchnorms(folded) == 0 and not folded.training
    assert model.training and batchnorms(model) == 13  # the original is untouched
    with torch.no_grad():
        expected = model.eval()(images)
        torch.testing.assert_close(folded(images), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs


def test_the_batchnorm_after_a_tucker2_layer_folds_into_its_last_conv():
    model = decomposed()
    folded = fold_batchnorm(model)
    last = folded.get_submodule("features.block1.0.last")
    assert last.bias is not None and model.get_submodule("features.block1.0.last").bias is None
    assert not hasattr(folded.features.block1, "1")  # the BatchNorm is gone


def test_a_batchnorm_whose_conv_output_is_used_elsewhere_stays():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = with_trained_batchnorms(Branch())
    folded, images = fold_batchnorm(model), torch.randn(2, 3, 8, 8)
    assert batchnorms(folded) == 1
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model.eval()(images))


def test_an_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="cannot fold the BatchNorm layers of DataDependent: torch.fx cannot trace"):
        fold_batchnorm(DataDependent())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("make", [baseline, decomposed])
def test_torchscript_export_carries_no_batchnorm_and_matches_the_unfolded_model(make, tmp_path):
    model = make()
    difference = save_torchscript(model, tmp_path / "model.ts")
    assert difference < 1e-4
    assert "batch_norm" not in str(torch.jit.load(str(tmp_path / "model.ts")).inlined_graph)
    assert batchnorms(model) == 13  # the model passed in keeps its BatchNorms (the .pt is written from it)


@pytest.mark.parametrize("make", [baseline, decomposed])
def test_onnx_export_carries_no_batchnorm_and_matches_the_unfolded_model(make, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = make()
    difference = save_onnx(model, tmp_path / "model.onnx")
    assert difference < 1e-4
    ops = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    assert "BatchNormalization" not in ops and ops["Conv"] >= 13


@pytest.mark.parametrize(("save", "name"), [(save_torchscript, "model.ts"), (save_onnx, "model.onnx")])
def test_a_deployable_file_that_computes_otherwise_is_refused_and_not_left_behind(save, name, tmp_path, monkeypatch):
    """The ONNX / TorchScript check has a tolerance: a file whose logits differ (here a folding gone wrong) is an
    error, and nothing is left under its name nor beside it."""
    from ranksearch.deliver import export

    if save is save_onnx:
        pytest.importorskip("onnxruntime")

    def wrong_fold(model: nn.Module) -> nn.Module:
        folded = fold_batchnorm(model)
        with torch.no_grad():
            list(folded.parameters())[-1].add_(1.0)  # the classifier's bias: every logit off by 1
        return folded

    monkeypatch.setattr(export, "fold_batchnorm", wrong_fold)
    with pytest.raises(export.UserError, match="differs from the PyTorch model by .*not written"):
        save(baseline(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []
