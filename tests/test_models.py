import pytest
import torch
from torch import nn

from ranksearch import set_ranks, vgg16_cifar
from ranksearch.models import build_model, get_ranks, rank_modules, register_model


def test_vgg16_has_13_convs_in_5_modules():
    modules = rank_modules(vgg16_cifar())
    assert list(modules) == ["block1", "block2", "block3", "block4", "block5"]
    assert [len(layers) for layers in modules.values()] == [2, 2, 3, 3, 3]
    assert sum(isinstance(m, nn.Conv2d) for m in vgg16_cifar().modules()) == 13


@pytest.mark.parametrize("num_classes,width", [(10, 1.0), (7, 0.25), (100, 0.5)])
def test_output_shape_follows_num_classes_and_width(num_classes, width):
    model = vgg16_cifar(num_classes=num_classes, width=width).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)
    assert model.classifier.in_features == round(512 * width)


def test_rank_buffers_are_in_state_dict_and_survive_save_load(tmp_path):
    model = set_ranks(vgg16_cifar(width=0.25), [1 / 32, 2 / 32, 8 / 32, 16 / 32, 1.0])
    keys = [k for k in model.state_dict() if k.endswith(".rank")]
    assert len(keys) == 13
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = vgg16_cifar(width=0.25)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert get_ranks(fresh) == {"block1": 1 / 32, "block2": 2 / 32, "block3": 0.25, "block4": 0.5, "block5": 1.0}


def test_set_ranks_accepts_a_mapping_and_rejects_bad_ranks():
    model = set_ranks(vgg16_cifar(width=0.25), {"block3": 4 / 32})
    assert get_ranks(model)["block3"] == 0.125 and get_ranks(model)["block1"] == 1.0
    with pytest.raises(ValueError, match="off the grid"):
        set_ranks(model, [0.3, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="off the grid"):
        set_ranks(model, [0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="expected 5 ranks"):
        set_ranks(model, [1, 1])
    with pytest.raises(ValueError, match="unknown modules"):
        set_ranks(model, {"block9": 1.0})


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg16")(vgg16_cifar)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9000")


def test_set_ranks_refuses_a_decomposed_model():
    from ranksearch import decompose

    decomposed = decompose(set_ranks(vgg16_cifar(width=0.25), [1.0, 1.0, 0.25, 1.0, 1.0]))
    with pytest.raises(ValueError, match="needs an undecomposed model.*features.block3.0 is already a Tucker2Conv"):
        set_ranks(decomposed, [0.5] * 5)
    assert get_ranks(decomposed)["block1"] == 1.0  # nothing was changed
