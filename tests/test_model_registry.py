"""The model registry: ResNets and torchvision models, their grouping rules, rank buffers and search spaces."""

import copy

import optuna
import pytest
import torch
from torch import nn

from conftest import SMOKE_CONFIG, run_cli, write_imagefolder
from ranksearch import decompose, load_model
from ranksearch.data.inputs import CIFAR10_CLASSES
from ranksearch.decompose import Tucker2Conv, decomposed_from_state_dict
from ranksearch.models import (
    build_model,
    check_model_name,
    get_ranks,
    is_eligible,
    module_names,
    rank_layers,
    rank_modules,
    register_family,
    set_ranks,
    top_level_children,
)
from ranksearch.search.trial import decomposed_model, suggest_ranks
from ranksearch.study.config import load_config
from ranksearch.utils.errors import UserError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- the CIFAR ResNets -------------------------------------------------------------------------------------------

# Exact counts of our builders (option-A shortcuts for resnet20/56, option B for resnet18), and what was published:
# He et al. 2016, table 6: ResNet-20 0.27 M, ResNet-56 0.85 M; ResNet-18 for CIFAR (kuangliu/pytorch-cifar) 11.2 M.
PARAMS = {"resnet20": (269_722, 0.27e6), "resnet56": (853_018, 0.85e6), "resnet18": (11_173_962, 11.2e6)}


@pytest.mark.parametrize("name", PARAMS)
def test_resnet_parameter_counts_are_the_published_ones(name):
    exact, published = PARAMS[name]
    count = n_params(build_model(name))
    assert count == exact
    assert abs(count - published) / published < 0.01


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet56", "resnet18", "torchvision:resnet18", "torchvision:mobilenet_v2"]
)
def test_forward_maps_cifar_images_to_logits(name):
    model = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name,width", [("resnet20", 0.5), ("resnet56", 0.25), ("resnet18", 0.125)])
def test_resnet_width_and_num_classes(name, width):
    model = build_model(name, num_classes=7, width=width).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.fc.in_features == round((512 if name == "resnet18" else 64) * width)


@pytest.mark.parametrize(
    "name,modules,convs",
    [
        ("resnet20", ["stem", "stage1", "stage2", "stage3"], [1, 6, 6, 6]),
        ("resnet56", ["stem", "stage1", "stage2", "stage3"], [1, 18, 18, 18]),
        ("resnet18", ["stem", "stage1", "stage2", "stage3", "stage4"], [1, 4, 4, 4, 4]),
        ("vgg16", ["block1", "block2", "block3", "block4", "block5"], [2, 2, 3, 3, 3]),
        ("torchvision:resnet18", ["conv1", "layer1", "layer2", "layer3", "layer4"], [1, 4, 4, 4, 4]),
        ("torchvision:mobilenet_v2", ["features.0"], [1]),  # its only eligible conv is the 3x3 stem
    ],
)
def test_each_model_groups_its_convs_into_its_modules(name, modules, convs):
    found = rank_modules(build_model(name))
    assert list(found) == modules
    assert [len(layers) for layers in found.values()] == convs


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_rank_buffers_are_on_exactly_the_eligible_convs(name):
    model = build_model(name)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    eligible = [n for n, m in convs if m.groups == 1 and m.kernel_size != (1, 1)]
    assert [n for n, _ in rank_layers(model)] == eligible
    assert all("rank" not in dict(m.named_buffers()) for n, m in convs if n not in eligible)
    assert all(float(m.rank) == 1.0 for _, m in rank_layers(model))
    if name == "torchvision:mobilenet_v2":
        depthwise = [n for n, m in convs if m.groups > 1]
        assert depthwise and not set(depthwise) & set(eligible)
    assert not is_eligible(nn.Conv2d(8, 8, 3, groups=8)) and not is_eligible(nn.Conv2d(8, 8, 1))


def test_torchvision_models_build_without_a_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("ranksearch must never download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = build_model("torchvision:resnet18", num_classes=10)
    assert model.fc.out_features == 10 and model.ranksearch_name == "torchvision:resnet18"


def test_torchvision_names_and_width_are_checked_with_clear_errors():
    assert check_model_name("torchvision:mobilenet_v2") == "torchvision:mobilenet_v2"
    with pytest.raises(ValueError, match="unknown model 'torchvision:resnet1'.*torchvision:resnet18"):
        build_model("torchvision:resnet1")
    with pytest.raises(ValueError, match="width must be 1.0"):
        build_model("torchvision:resnet18", width=0.5)
    with pytest.raises(UserError, match="width must be 1.0"):
        load_config(None, {"model": "torchvision:resnet18", "width": 0.5})
    with pytest.raises(UserError, match="unknown model 'resnet9'.*resnet20.*torchvision:<name>"):
        load_config(None, {"model": "resnet9"})
    assert load_config(None, {"model": "torchvision:resnet18"}).model == "torchvision:resnet18"
    with pytest.raises(ValueError, match="already registered"):
        register_family("torchvision", variants=lambda: [])(lambda name, **kwargs: nn.Identity())


def test_the_default_grouping_splits_children_when_fewer_than_3_hold_layers():
    names = ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]
    assert top_level_children(names) == ["conv1", "layer1", "layer1", "layer2"]
    assert top_level_children(names[:3]) == ["conv1", "layer1.0", "layer1.1"]  # 2 modules would hardly be a search
    assert top_level_children(["features.0.0", "features.1.conv.0", "classifier.1"]) == [
        "features.0",
        "features.1",
        "classifier",
    ]  # mobilenet_v2 with its 1x1 convs and linear layer ranked (svd_layers)
    assert top_level_children(["features.0.0", "features.3.conv.1"]) == ["features.0", "features.3"]
    assert top_level_children(["conv"]) == ["conv"]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)))
    for layer in model.modules():  # a model built outside the registry: the default grouping
        if isinstance(layer, nn.Conv2d):
            layer.register_buffer("rank", torch.tensor(1.0))
    assert module_names(model) == ["0", "2.0", "2.1"]  # 2 top-level children: split


# ----- search spaces ---------------------------------------------------------------------------------------------


def test_layer_space_gives_one_module_per_eligible_conv():
    model = build_model("resnet20")
    layers = rank_modules(model, "layer")
    assert len(layers) == 19 and list(layers)[:3] == ["stem.0", "stage1.0.conv1", "stage1.0.conv2"]
    assert all(pairs == [(name, model.get_submodule(name))] for name, pairs in layers.items())
    with pytest.raises(ValueError, match="unknown search space"):
        rank_modules(model, "block")
    with pytest.raises(UserError, match="search_space must be one of module, layer"):
        load_config(None, {"search_space": "conv"})


@pytest.mark.parametrize("space", ["module", "layer"])
def test_set_and_get_ranks_round_trip_on_a_resnet(space):
    model = build_model("resnet18", width=0.25)
    names = module_names(model, space)
    ranks = {name: (index % 32 + 1) / 32 for index, name in enumerate(names)}
    assert get_ranks(set_ranks(model, list(ranks.values()), space=space), space) == ranks
    again = build_model("resnet18", width=0.25)
    again.load_state_dict(model.state_dict())
    assert get_ranks(again, space) == ranks


def test_the_grouping_survives_a_deep_copy():
    model = copy.deepcopy(build_model("vgg11", width=0.25))
    assert module_names(model) == ["block1", "block2", "block3", "block4", "block5"]


# ----- decomposing a ResNet --------------------------------------------------------------------------------------


def test_a_decomposed_resnet20_runs_and_keeps_its_modules():
    torch.manual_seed(0)
    model = set_ranks(build_model("resnet20"), [1.0, 0.5, 0.25, 4 / 32])
    decomposed = decompose(model).eval()
    modules = rank_modules(decomposed)
    assert list(modules) == ["stem", "stage1", "stage2", "stage3"]
    assert isinstance(modules["stage3"][0][1], Tucker2Conv) and isinstance(modules["stem"][0][1], nn.Conv2d)
    assert get_ranks(decomposed) == {"stem": 1.0, "stage1": 0.5, "stage2": 0.25, "stage3": 4 / 32}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert decomposed(x).shape == (2, 10)
    rebuilt = decomposed_from_state_dict(build_model("resnet20"), decomposed.state_dict()).eval()
    assert isinstance(rebuilt.stage3[0].conv1, Tucker2Conv)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), decomposed(x))


def test_a_trial_decomposes_at_per_layer_ranks():
    config = load_config(None, {"model": "resnet20", "width": 0.5, "search_space": "layer"})
    baseline = build_model(config.model, width=config.width)
    modules = module_names(baseline, config.search_space)
    trial = optuna.create_study().ask()
    ranks = suggest_ranks(trial, modules, config)
    assert list(trial.params) == [f"rank_{name}" for name in modules]
    model = decomposed_model(baseline, ranks, config, torch.device("cpu"))
    assert get_ranks(model, "layer") == ranks


# ----- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_and_export_a_resnet20(tmp_path, tiny_imagefolder):
    smoke = ("--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder))
    result = run_cli("run", *smoke, "--model", "resnet20", "--width", "0.25", "--trials", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'studies' / 'smoke.db'}")
    assert list(study.trials[0].params) == ["rank_stem", "rank_stage1", "rank_stage2", "rank_stage3"]
    assert study.user_attrs["config"]["model"] == "resnet20"
    result = run_cli("export", "--study-name", "smoke", "--trial", "best", "--max-drop", "100", "--out", "best.pt",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = load_model(tmp_path / "best.pt")
    assert model.ranksearch_name == "resnet20" and module_names(model) == ["stem", "stage1", "stage2", "stage3"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_run_and_export_a_torchvision_resnet18_in_layer_space(tmp_path, tiny_imagefolder):
    smoke = ("--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--pretrain-epochs", "1")
    ranks = ",".join(["4/32"] * 17)
    result = run_cli("run", *smoke, "--model", "torchvision:resnet18", "--width", "1", "--search-space", "layer",
                     "--study-name", "tv", "--ranks", ranks, "--trials", "2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="tv", storage=f"sqlite:///{tmp_path / 'studies' / 'tv.db'}")
    assert len(study.trials[0].params) == 17 and "rank_layer4.1.conv2" in study.trials[0].params  # 17 3x3+ convs
    result = run_cli("export", "--study-name", "tv", "--trial", "0", "--out", "tv.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = load_model(tmp_path / "tv.pt")
    assert isinstance(model.layer4[1].conv2, Tucker2Conv) and model.ranksearch_name == "torchvision:resnet18"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_each_model_gets_a_study_of_its_own_unless_one_is_named():
    assert load_config(None, {}).study_name == "vgg16-cifar10"
    assert load_config(None, {"model": "resnet20"}).study_name == "resnet20-cifar10"
    assert load_config(None, {"model": "torchvision:resnet18"}).study_name == "torchvision-resnet18-cifar10"
    assert load_config(None, {"model": "resnet20", "study_name": "mine"}).study_name == "mine"


def test_other_data_gets_a_study_named_by_its_folder_unless_one_is_named(tmp_path):
    """Every unnamed study was '<model>-cifar10', whatever the data: a user's 7-class 64x64 set included."""
    flowers = write_imagefolder(tmp_path / "my flowers!", train_per_class=1, test_per_class=1, classes=["a", "b"])
    cifar = write_imagefolder(tmp_path / "copy", train_per_class=1, test_per_class=1, classes=list(CIFAR10_CLASSES))
    assert load_config(None, {"data_dir": str(flowers)}).study_name == "vgg16-my-flowers"
    assert load_config(None, {"data_dir": str(flowers), "model": "torchvision:resnet18"}).study_name == (
        "torchvision-resnet18-my-flowers")  # fmt: skip
    assert load_config(None, {"data_dir": str(cifar)}).study_name == "vgg16-cifar10"  # CIFAR-10's classes
    assert load_config(None, {"data_dir": str(flowers), "study_name": "mine"}).study_name == "mine"
