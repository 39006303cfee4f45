"""Warm starts: VBMF ranks on the 1/32 grid (``ranks --vbmf``) and the vectors ``run --warm-start`` queues first."""

import itertools

import optuna
import pytest
import torch

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.cli import _ranks_report, main
from ranksearch.decompose import tucker2_ranks
from ranksearch.models import RANK_GRID, build_model, rank_modules
from ranksearch.search import warmstart
from ranksearch.search.warmstart import (
    LayerEstimate,
    VBMFRanks,
    clip_ranks,
    enqueue_warm_starts,
    grid_rank,
    guard_zero,
    matrix_vbmf_rank,
    svd_grid_rank,
    uniform_ranks,
    vbmf_ranks,
    warm_start_vectors,
)
from ranksearch.study.config import load_config
from ranksearch.train.baseline import new_model
from ranksearch.utils.errors import UserError

SMOKE = ("--config", str(SMOKE_CONFIG))
MODULES = ["block1", "block2", "block3", "block4", "block5"]


# ----- the mapping (R_in, R_out) -> grid rank ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "found,in_channels,out_channels,rank",
    [
        ((2, 2), 8, 8, 6 / 32),  # R = round(r * 8): 5/32 gives round(1.25) = 1, 6/32 round(1.5) = 2
        ((0, 3), 16, 32, 3 / 32),  # the larger mode decides
        ((3, 0), 16, 32, 3 / 32),
        ((1, 1), 4, 4, 1 / 32),  # R = max(1, round(0.125)) = 1
        ((32, 32), 32, 32, 1.0),
        ((20, 4), 32, 16, 1.0),  # R_in 20 > Cout: no grid rank reaches it; clipped to 1
        ((0, 0), 64, 64, 1 / 32),  # only noise: counts as rank 1
    ],
)
def test_grid_rank_is_the_smallest_grid_rank_covering_the_estimate(found, in_channels, out_channels, rank):
    assert grid_rank(found, in_channels, out_channels) == rank


def covers(rank: float, found: tuple[int, int], in_channels: int, out_channels: int) -> bool:
    """Whether ``rank``'s Tucker-2 ranks are at least ``found`` (a 0 counted as 1) in both modes."""
    got, need = tucker2_ranks(rank, in_channels, out_channels), guard_zero(found)
    return got[0] >= need[0] and got[1] >= need[1]


@pytest.mark.parametrize("in_channels,out_channels", [(3, 4), (8, 8), (16, 32), (64, 48), (100, 7)])
def test_grid_rank_covers_the_estimate_and_one_step_less_does_not(in_channels, out_channels):
    for found in itertools.product(range(in_channels + 1), range(out_channels + 1)):
        rank = grid_rank(found, in_channels, out_channels)
        assert rank in RANK_GRID
        if covers(1.0, found, in_channels, out_channels):  # else nothing covers it: rank 1
            assert covers(rank, found, in_channels, out_channels)
        else:
            assert rank == 1.0
        if rank > 1 / 32:
            assert not covers(rank - 1 / 32, found, in_channels, out_channels)


def test_rank_zero_is_guarded_to_one():
    assert guard_zero((0, 0)) == (1, 1) and guard_zero((0, 5)) == (1, 5) and guard_zero((3, 2)) == (3, 2)


@pytest.mark.parametrize(
    "found,in_features,out_features,rank",
    [
        (3, 32, 10, 9 / 32),  # R = round(r * 10): 8/32 gives round(2.5) = 2, 9/32 round(2.8125) = 3
        (0, 64, 10, 1 / 32),  # only noise: counts as 1
        (10, 64, 10, 31 / 32),  # round(9.6875) = 10: full rank one step below 1
        (1, 128, 128, 1 / 32),
    ],
)
def test_svd_grid_rank_of_a_pointwise_layer(found, in_features, out_features, rank):
    assert svd_grid_rank(found, in_features, out_features) == rank


# ----- per conv and per module ---------------------------------------------------------------------------------------


def fake_vbmf(monkeypatch, model, found_by_name):
    """Make ``warmstart`` see ``found_by_name[conv name]`` as each conv's VBMF estimate."""
    names = {id(layer.weight): name for layers in rank_modules(model).values() for name, layer in layers}
    monkeypatch.setattr(warmstart, "tucker2_vbmf_ranks", lambda weight, weakening: found_by_name[names[id(weight)]])


def test_a_module_takes_the_largest_rank_of_its_convs(monkeypatch):
    model = build_model("vgg16", num_classes=10, width=0.0625)  # block3: three 16-channel convs
    convs = [name for layers in rank_modules(model).values() for name, _ in layers]
    found = dict.fromkeys(convs, (1, 1)) | {"features.block3.3": (0, 4), "features.block3.6": (6, 0)}
    fake_vbmf(monkeypatch, model, found)
    estimates = vbmf_ranks(model, "module", 1.0)
    by_name = {layer.name: layer for layer in estimates.layers}
    assert [layer.name for layer in estimates.layers] == convs and list(estimates.modules) == MODULES
    # Cout 16: R = round(k / 2), Python's round (half to even): 4 first at k = 7 (3.5 -> 4), 6 at k = 11 (5.5 -> 6)
    assert by_name["features.block3.3"].rank == 7 / 32 and by_name["features.block3.6"].rank == 11 / 32
    assert by_name["features.block3.3"].found_only_noise and not by_name["features.block3.0"].found_only_noise
    assert estimates.modules["block3"] == 11 / 32  # the largest of 1/32, 7/32, 11/32
    for module, rank in estimates.modules.items():
        assert rank == max(layer.rank for layer in estimates.layers if layer.module == module)


def test_vbmf_ranks_of_a_real_model_per_layer():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, width=0.25)
    estimates = vbmf_ranks(model, "layer", 1.0)
    assert list(estimates.modules) == [layer.name for layer in estimates.layers] == list(rank_modules(model, "layer"))
    for layer in estimates.layers:
        cout, cin, _, _ = layer.shape
        assert 0 <= layer.found[0] <= cin and 0 <= layer.found[1] <= cout and layer.rank in RANK_GRID
        assert estimates.modules[layer.name] == layer.rank and layer.form == "tucker2"


def test_vbmf_of_a_low_rank_matrix_and_of_svd_layers():
    torch.manual_seed(0)
    low_rank = torch.randn(40, 3) @ torch.randn(3, 60) + 0.01 * torch.randn(40, 60)
    assert matrix_vbmf_rank(low_rank, 1.0) == 3 and matrix_vbmf_rank(low_rank[:, :, None, None], 1.0) == 3
    assert matrix_vbmf_rank(torch.zeros(8, 8), 1.0) == 0
    model = build_model("vgg16", num_classes=10, width=0.0625, svd_layers=True)
    estimates = vbmf_ranks(model, "module", 1.0)
    (linear,) = [layer for layer in estimates.layers if layer.form == "svd"]
    assert linear.shape == (10, 32) and linear.found[0] == linear.found[1]
    assert linear.rank == svd_grid_rank(linear.found[0], 32, 10) == estimates.modules[linear.module]


def test_the_report_notes_noise_and_prints_the_ranks_argument():
    layers = [
        LayerEstimate("features.block1.0", "block1", "tucker2", (4, 3, 3, 3), (0, 0), 1 / 32),
        LayerEstimate("features.block2.0", "block2", "tucker2", (8, 4, 3, 3), (2, 2), 6 / 32),
        LayerEstimate("classifier", "classifier", "svd", (10, 32), (0, 0), 1 / 32),
    ]
    modules = {"block1": 1 / 32, "block2": 6 / 32, "classifier": 1 / 32}
    lines = _ranks_report(VBMFRanks(1.0, layers, modules), load_config(SMOKE_CONFIG)).splitlines()
    assert "features.block1.0: VBMF found no component above the noise (rank 0 for R_in, R_out); using 1" in lines
    assert "classifier: VBMF found no component above the noise (rank 0); using 1" in lines
    assert lines[-1] == "--ranks 1/32,6/32,1/32"
    clipped = _ranks_report(VBMFRanks(1.0, layers, modules),
                            load_config(SMOKE_CONFIG, {"rank_min": 2 / 32}))  # fmt: skip
    assert clipped.splitlines()[-1] == "--ranks 2/32,6/32,2/32  (clipped into rank_min..rank_max: 2/32..32/32)"


# ----- the warm start's vectors --------------------------------------------------------------------------------------


def test_clip_and_uniform_sweep_stay_within_rank_min_and_max():
    assert clip_ranks([1 / 32, 0.5, 1.0], 2 / 32, 24 / 32) == [2 / 32, 0.5, 24 / 32]
    assert uniform_ranks(3, 1 / 32, 1.0) == [[k / 32] * 3 for k in (2, 4, 8, 16)]
    assert uniform_ranks(2, 3 / 32, 8 / 32) == [[4 / 32] * 2, [8 / 32] * 2]


def test_warm_start_vectors_in_the_given_order_vbmf_clipped(monkeypatch):
    model = build_model("vgg16", num_classes=10, width=0.0625)
    convs = [name for layers in rank_modules(model).values() for name, _ in layers]
    fake_vbmf(monkeypatch, model, dict.fromkeys(convs, (0, 0)) | {"features.block5.6": (32, 32)})
    config = load_config(SMOKE_CONFIG, {"warm_start": ["vbmf", "uniform"], "rank_min": 2 / 32, "rank_max": 0.5})
    vbmf_point = [2 / 32] * 4 + [0.5]  # 1/32 and 32/32, clipped
    assert warm_start_vectors(config, model) == [vbmf_point] + [[k / 32] * 5 for k in (2, 4, 8, 16)]
    config.warm_start = ["uniform", "vbmf"]
    assert warm_start_vectors(config, model)[-1] == vbmf_point
    config.search_space = "layer"
    assert [len(v) for v in warm_start_vectors(config, model)] == [13] * 5


def test_vbmf_warm_start_needs_tucker2():
    with pytest.raises(UserError, match="warm start vbmf estimates Tucker-2 ranks, not cp's; use uniform"):
        load_config(SMOKE_CONFIG, {"warm_start": ["vbmf"], "decomposition": "cp"})
    assert load_config(SMOKE_CONFIG, {"warm_start": ["uniform"], "decomposition": "cp"}).warm_start == ["uniform"]


def test_enqueue_skips_vectors_the_study_holds_or_the_list_repeats():
    study = optuna.create_study(directions=["maximize", "minimize"])
    names = {f"rank_{m}": optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32) for m in MODULES}
    done = optuna.trial.create_trial(params=dict.fromkeys(names, 8 / 32), distributions=names, values=[0.5, 1.0])
    study.add_trial(done)
    study.enqueue_trial({"rank_stage1": 2 / 32})  # another search space: never a match
    vectors = [[2 / 32] * 5, [4 / 32] * 5, [2 / 32] * 5, [8 / 32] * 5, [16 / 32] * 5]
    enqueued, skipped = enqueue_warm_starts(study, MODULES, vectors)
    assert enqueued == [[2 / 32] * 5, [4 / 32] * 5, [16 / 32] * 5] and skipped == [[2 / 32] * 5, [8 / 32] * 5]
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting[1:]] == [dict.fromkeys(names, r[0]) for r in enqueued]
    assert enqueue_warm_starts(study, MODULES, vectors) == ([], vectors)  # queued ones count as held


# ----- through the CLI -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragments",
    [
        (("ranks", "--vbmf", "--weakening", "0"), ("--weakening must be a finite number > 0", "got 0.0")),
        (("ranks", "--vbmf", "--weakening", "-1"), ("--weakening must be a finite number > 0",)),
        (("ranks", "--vbmf", "--weakening", "nan"), ("--weakening must be a finite number > 0",)),
        (("ranks",), ("ranks needs --vbmf", "the only rank estimator")),
        (("ranks", "--vbmf", "--decomposition", "cp"), ("ranks --vbmf estimates Tucker-2 ranks, not cp's",)),
        (("run", "--warm-start", "foo"), ("warm_start must name vbmf or uniform", "'foo'")),
        (("run", "--warm-start", "vbmf,,uniform"), ("warm_start must name vbmf or uniform", "''")),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, fragments):
    monkeypatch.chdir(tmp_path)
    assert main([*args, *SMOKE, "--data-dir", str(tmp_path / "no-data-needed")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("ranksearch: error: ")
    assert all(fragment in error for fragment in fragments), error
    assert list(tmp_path.iterdir()) == []  # refused before any work


def cached_baseline(workdir):
    """The smoke baseline the ``workdir`` fixture holds, as ``run`` and ``ranks`` load it."""
    (path,) = (workdir / "studies" / "baselines").glob("*.pt")
    model = new_model(load_config(SMOKE_CONFIG))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return model


@pytest.mark.slow
def test_ranks_vbmf_prints_the_baselines_ranks(workdir, tiny_imagefolder):
    result = run_cli("ranks", "--vbmf", *SMOKE, "--data-dir", str(tiny_imagefolder), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "(cached)" in result.stderr  # the baseline `pretrain` made, not a new one
    expected = vbmf_ranks(cached_baseline(workdir), "module", 1.0)
    lines = result.stdout.splitlines()
    for layer in expected.layers:
        (row,) = [line for line in lines if line.startswith(layer.name + " ")]
        assert row.split()[-3:] == [str(layer.found[0]), str(layer.found[1]), f"{round(layer.rank * 32)}/32"]
        assert " x ".join(map(str, layer.shape)) in row and " tucker2 " in row
    for module, rank in expected.modules.items():
        assert f"  {module:<22} {round(rank * 32):>2}/32" in lines
    assert lines[-2] == "--ranks " + ",".join(f"{round(r * 32)}/32" for r in expected.modules.values())
    assert lines[-1].startswith("its cost: MACs ")  # what that vector costs (issue 28)


def study_params(workdir) -> tuple[list[list[float]], list[optuna.trial.FrozenTrial]]:
    """Every trial's ranks (a queued one's fixed ranks), in trial order, and the trials."""
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir / 'studies' / 'smoke.db'}")
    trials = study.get_trials(deepcopy=False)
    return [[t.system_attrs.get("fixed_params", t.params)[f"rank_{m}"] for m in MODULES] for t in trials], trials


@pytest.mark.slow
def test_run_warm_start_queues_vbmf_then_uniform_and_a_second_run_skips_them(workdir, tiny_imagefolder):
    config = load_config(SMOKE_CONFIG, {"warm_start": ["vbmf", "uniform"]})
    expected = []
    for ranks in warm_start_vectors(config, cached_baseline(workdir)):
        expected += [ranks] if ranks not in expected else []
    smoke_run = lambda trials: run_cli(  # noqa: E731
        "run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--warm-start", "vbmf,uniform", "--trials", trials,
        cwd=workdir,
    )  # fmt: skip

    first = smoke_run("2")
    assert first.returncode == 0, first.stderr
    assert f"warm start (vbmf,uniform): enqueued {len(expected)}: " in first.stdout
    assert f"{len(expected) - 2} queued trial(s) beyond --trials 2 wait for a later run" in first.stdout
    params, trials = study_params(workdir)
    assert params == expected  # in order, the first two run (within --trials), the rest waiting
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2 + ["WAITING"] * (len(expected) - 2)

    second = smoke_run("1")
    assert second.returncode == 0, second.stderr
    assert f"enqueued 0: none; skipped {len(expected)} already in the study or repeated" in second.stdout
    params, trials = study_params(workdir)
    assert params == expected and [t.state.name for t in trials[:3]] == ["COMPLETE"] * 3


def test_the_uniform_sweep_is_the_default_warm_start_and_none_turns_it_off():
    from ranksearch.cli import _parse_names

    assert load_config(None, {}).warm_start == ["uniform"]
    assert _parse_names("none") == [] and load_config(None, {"warm_start": _parse_names("none")}).warm_start == []
    assert load_config(SMOKE_CONFIG, {}).warm_start == []  # the tests' config chooses its own ranks
