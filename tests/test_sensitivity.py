"""Sensitivity analysis: one module decomposed alone, points stored and shared, exact allocations, the warm start."""

import copy
import itertools
import random

import optuna
import pytest
import torch

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.decompose import DecomposedLayer
from ranksearch.models import RANK_STEPS, build_model, rank_modules, set_ranks
from ranksearch.objectives.cost_table import cost_table
from ranksearch.search.sensitivity import Point, allocate, ladder, module_options, wanted_points
from ranksearch.study.config import Config


def _fake_curves(table, rng, monotone=True):
    """Made-up points: accuracy rising with rank (with noise when not ``monotone``)."""
    measured = {}
    for module in table.modules:
        points = []
        for rank in ladder(Config(), table, module):
            accuracy = 0.9 - 0.5 * (1 - rank) ** 2 * rng.uniform(0.2, 1.0)
            points.append(Point(module, rank, accuracy, {"macs": 0.0, "params": 0.0}))
        if monotone:
            points = sorted(points, key=lambda p: p.rank)
            best = [min(p.accuracy for p in points[i:]) for i in range(len(points))]
            points = [Point(p.module, p.rank, a, p.ratios) for p, a in zip(points, best, strict=True)]
        measured[module] = points
    return measured


def test_allocations_are_exact_under_the_additive_model():
    table = cost_table(build_model("vgg16", width=0.25, num_classes=10))
    config = Config()
    measured = _fake_curves(table, random.Random(1))
    budgets = [0.5, 0.3, 0.2, 0.1]
    found = {a.budget: a for a in allocate(config, table, measured, 0.9, "macs", budgets)}
    options = [module_options(config, table, m, measured[m], 0.9, "macs") for m in table.modules]
    for budget in budgets:  # brute force over every combination of options
        best = None
        for combo in itertools.product(*options):
            ranks = [rank for rank, _, _ in combo]
            if table.ratio("macs", ranks) <= budget + 1e-12:
                drop = sum(d for _, d, _ in combo)
                best = drop if best is None else min(best, drop)
        assert found[budget].predicted == pytest.approx(max(0.0, 0.9 - best))
        assert found[budget].ratio == pytest.approx(table.ratio("macs", found[budget].ranks))
        assert found[budget].ratio <= budget


def test_a_lower_rank_that_measured_better_by_noise_is_not_trusted():
    table = cost_table(build_model("vgg16", width=0.25, num_classes=10))
    points = [Point("block1", 2 / 32, 0.80, {}), Point("block1", 4 / 32, 0.70, {}), Point("block1", 8 / 32, 0.85, {})]
    options = {rank: drop for rank, drop, _ in module_options(Config(), table, "block1", points, 0.9, "macs")}
    assert options[8 / 32] == pytest.approx(0.05)
    assert options[4 / 32] == pytest.approx(0.20)
    assert options[2 / 32] == pytest.approx(0.20)  # measured 0.80, trusted no better than 4/32's 0.70


def test_the_ladder_skips_ranks_that_leave_a_module_as_it_is():
    table = cost_table(build_model("vgg16", width=0.25, num_classes=10))
    config = Config(rank_min=2 / 32, rank_max=1.0)
    for module in table.modules:
        ranks = ladder(config, table, module)
        assert ranks[0] == 2 / 32 and 1 / 32 not in ranks
        assert 1.0 not in ranks  # VGG's convs at rank 1 are not cheaper: they stay as they are
    assert len(wanted_points(config, table)) == 5 * 8


def test_a_point_decomposes_its_module_alone():
    from ranksearch.search.trial import decomposed_model

    model = build_model("vgg16", width=0.25, num_classes=10)
    only = {name for name, _ in rank_modules(model)["block3"]}
    decomposed = decomposed_model(set_ranks(copy.deepcopy(model), [1.0] * 5), {"block3": 4 / 32}, Config(),
                                  torch.device("cpu"), only=only)  # fmt: skip
    for module, pairs in rank_modules(decomposed).items():
        assert all(isinstance(layer, DecomposedLayer) == (module == "block3") for _, layer in pairs)


def _sensitivity_study(cwd, storage=None):
    url = storage or f"sqlite:///{cwd}/studies/baselines/sensitivity.db"  # beside the baselines (0.12.0)
    names = [s.study_name for s in optuna.get_all_study_summaries(url) if "-sensitivity-" in s.study_name]
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=url)


def _table(stdout: str) -> str:
    start = stdout.index("val accuracy with one module")
    return stdout[start : stdout.index("study '", start)]


@pytest.mark.slow
def test_sensitivity_measures_each_point_once_writes_plots_and_warm_starts_a_run(workdir, tiny_imagefolder):
    data = str(tiny_imagefolder)
    first = run_cli("sensitivity", "--config", str(SMOKE_CONFIG), "--data-dir", data, "--out", "sens", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "measuring 45 of 45 points" in first.stdout
    assert "val accuracy with one module decomposed alone" in first.stdout and "allocations" in first.stdout
    for name in ("sensitivity.png", "sensitivity.html", "sensitivity.csv"):
        assert (workdir / "sens" / name).stat().st_size > 0
    study = _sensitivity_study(workdir)
    points = {(t.params["module"], t.params["rank"]) for t in study.trials if t.state.name == "COMPLETE"}
    assert len(points) == len(study.trials) == 45
    again = run_cli("sensitivity", "--config", str(SMOKE_CONFIG), "--data-dir", data, "--out", "sens", cwd=workdir)
    assert again.returncode == 0 and "measuring" not in again.stdout  # stored: nothing measured twice
    assert _table(again.stdout) == _table(first.stdout)  # the same table, read back from the study
    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", data, "--study-name", "main", "--warm-start",
                  "sensitivity", "--trials", "2", cwd=workdir)  # another study: the same points (issue 28)
    assert run.returncode == 0, run.stderr
    assert "measuring" not in run.stdout and "warm start (sensitivity): enqueued" in run.stdout
    assert len(_sensitivity_study(workdir).trials) == 45


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_sensitivity_workers_share_the_points(engine, request, workdir, tiny_imagefolder):
    storage = (request.getfixturevalue("postgres_url") if engine == "postgresql"
               else f"sqlite:///{workdir}/studies/shared.db")  # fmt: skip
    result = run_cli("sensitivity", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--storage",
                     storage, "--workers", "2", "--out", "sens", cwd=workdir, subprocess=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = _sensitivity_study(workdir, storage)  # a storage named by --storage holds the points
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    points = {(t.params["module"], t.params["rank"]) for t in complete}
    assert len(complete) == len(points) == 45, (result.stdout, result.stderr)  # a worker's error is in stderr
    workers = {t.user_attrs["worker"] for t in complete}
    assert workers >= {0, 1}  # both shared the points
    if workers != {0, 1}:  # SQLite cannot lock a queued row: two workers told one point, and one more ran the last
        assert "run by another worker at the same moment" in result.stdout and "still owed" in result.stderr, result
    assert "allocations" in result.stdout and (workdir / "sens" / "sensitivity.png").is_file()


@pytest.mark.slow
def test_run_with_workers_measures_the_points_with_its_workers_then_warm_starts(workdir, tiny_imagefolder):
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--workers", "2",
                     "--warm-start", "sensitivity", "--trials", "4", cwd=workdir, subprocess=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "w0 sensitivity [" in result.stdout and "w1 sensitivity [" in result.stdout
    assert "warm start (sensitivity): enqueued" in result.stdout
    points = _sensitivity_study(workdir)
    assert sorted(t.state.name for t in points.trials) == ["COMPLETE"] * 45
    main = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    assert len([t for t in main.trials if t.state.name == "COMPLETE"]) == 4


def test_the_point_ladder_steps_are_on_the_grid():
    from ranksearch.search.sensitivity import BUDGETS, LADDER_STEPS

    assert all(1 <= k <= RANK_STEPS for k in LADDER_STEPS) and list(BUDGETS) == sorted(BUDGETS, reverse=True)
