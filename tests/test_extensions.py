"""A decomposition, a cost and a model, each defined in one plugin file under tests/plugins (nothing in the package
names them), run end to end: `run --plugin FILE`, `report --plugin FILE`, `export --plugin FILE`, and
`load_model(path, plugins=[FILE])` in a fresh process."""

import hashlib
import json
import subprocess
import sys

import optuna
import pytest

from conftest import REPO, SMOKE_CONFIG, run_cli

PLUGINS = REPO / "tests" / "plugins"


def _run(workdir, data, *flags: str) -> subprocess.CompletedProcess:
    """A plugin's run in a process of its own, as every command on its study (``run_cli``: what a plugin
    registers stays in the process, and each later command imports it again when passed it)."""
    return run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(data), *flags, cwd=workdir,
                   subprocess="--plugin" in flags)  # fmt: skip


def _load_in_fresh_process(path, plugin: str) -> dict:
    """What a fresh interpreter (which imported no plugin) sees of the exported ``path``, loaded with ``plugin``."""
    code = (
        "import json, sys, torch\nfrom ranksearch import load_model\n"
        f"model = load_model({str(path)!r}, plugins=[{plugin!r}])\n"
        "kinds = sorted({type(m).__name__ for m in model.modules()})\n"
        "out = model(torch.zeros(2, *model.input_spec['size']))\n"
        "print(json.dumps({'kinds': kinds, 'out': list(out.shape), 'plugins': [m for m in sys.modules "
        "if m.startswith('ranksearch_plugin_')]}))"
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=path.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _study(workdir, name: str = "smoke") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/studies/{name}.db")


@pytest.mark.slow
def test_a_decomposition_from_a_plugin_file_runs_exports_and_loads(workdir, tiny_imagefolder):
    plugin = str(PLUGINS / "spatial_svd.py")
    result = _run(workdir, tiny_imagefolder, "--plugin", plugin, "--decomposition", "spatial-svd", "--trials", "2",
                  "--ranks", "8/32,8/32,8/32,8/32,8/32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = _study(workdir)
    trial = next(t for t in study.trials if t.state.name == "COMPLETE")
    digest = hashlib.sha256((PLUGINS / "spatial_svd.py").read_bytes()).hexdigest()
    assert study.user_attrs["config"]["plugins"] == [{"name": "spatial_svd.py", "sha256": digest}]  # by content
    assert trial.user_attrs["macs_ratio"] < 0.5 and trial.system_attrs["kept_convs"] == []
    out = workdir / "out" / "svd.pt"
    export = run_cli("export", "--study-name", "smoke", "--trial", str(trial.number), "--out", str(out),
                     "--plugin", plugin, cwd=workdir, subprocess=True)  # fmt: skip
    assert export.returncode == 0, export.stderr
    seen = _load_in_fresh_process(out, plugin)
    assert "SpatialSVDConv" in seen["kinds"] and "Tucker2Conv" not in seen["kinds"] and seen["out"] == [2, 10]
    assert len(seen["plugins"]) == 1  # imported again, as passed
    unknown = _run(workdir, tiny_imagefolder, "--decomposition", "spatial-svd", "--study-name", "other")
    assert unknown.returncode == 2 and "decomposition must be one of tucker2, cp" in unknown.stderr


@pytest.mark.slow
def test_a_cost_from_a_plugin_file_is_an_objective_reported_and_exported(workdir, tiny_imagefolder, tmp_path):
    result = _run(workdir, tiny_imagefolder, "--plugin", str(PLUGINS / "weight_kib.py"), "--objectives",
                  "accuracy,weight_kib", "--trials", "2", "--ranks", "4/32,4/32,4/32,4/32,4/32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = _study(workdir)
    assert study.metric_names == ["val_accuracy", "weight_kib"]
    trial = study.trials[0]
    assert trial.values[1] == trial.user_attrs["weight_kib"] and 0 < trial.user_attrs["weight_kib_ratio"] < 1
    assert trial.user_attrs["weight_kib"] / trial.user_attrs["weight_kib_ratio"] == pytest.approx(
        study.user_attrs["baseline_weight_kib"])  # fmt: skip
    report = run_cli("report", "--study-name", "smoke", "--out", str(tmp_path / "report"), "--plugin",
                     str(PLUGINS / "weight_kib.py"), cwd=workdir, subprocess=True)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "weight_kib" in (tmp_path / "report" / "trials.csv").read_text().splitlines()[0]
    export = run_cli("export", "--study-name", "smoke", "--max-drop", "100", "--out", "best.pt", "--plugin",
                     str(PLUGINS / "weight_kib.py"), cwd=workdir, subprocess=True)  # fmt: skip
    assert export.returncode == 0 and "lowest weights (KiB)" in export.stdout, export.stdout + export.stderr


@pytest.mark.slow
def test_a_model_from_a_plugin_file_pretrains_runs_exports_and_loads(workdir, tiny_imagefolder):
    plugin = str(PLUGINS / "tiny_net.py")
    result = _run(workdir, tiny_imagefolder, "--plugin", plugin, "--model", "tinynet", "--study-name", "tiny",
                  "--trials", "2", "--ranks", "4/32,8/32,16/32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = _study(workdir, "tiny")
    assert sorted(p for p in study.trials[0].params) == ["rank_block1", "rank_block2", "rank_block3"]
    export = run_cli("export", "--study-name", "tiny", "--trial", "0", "--out", "tiny.pt", "--plugin", plugin,
                     cwd=workdir, subprocess=True)  # fmt: skip
    assert export.returncode == 0, export.stderr
    seen = _load_in_fresh_process(workdir / "tiny.pt", plugin)
    assert "Tucker2Conv" in seen["kinds"] and seen["out"] == [2, 10] and len(seen["plugins"]) == 1
    missing = _run(workdir, tiny_imagefolder, "--plugin", str(PLUGINS / "nope.py"), "--model", "tinynet")
    assert missing.returncode == 2 and "plugin" in missing.stderr and "no such file" in missing.stderr
