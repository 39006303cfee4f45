"""Issue 24, S1 and the moved-plugin row: a study's or an export's plugins are never imported unless the user passes
them on the command (``--plugin``, ``load_model(path, plugins=[...])``); they are recorded by content (SHA-256), so
a moved plugin passed again is accepted (``run`` resumes, ``export`` exports) and a changed one is refused."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from conftest import REPO, SMOKE_CONFIG, run_cli
from ranksearch.deliver.load import load_model
from ranksearch.utils.errors import UserError

FIXTURES = Path(__file__).parent / "data"
# A plugin that says when it runs (it appends to MARKER) and registers a model and a cost, so that every command on
# its study needs it: export (the model, the cost it picks by), report (the cost), load_model (the model).
MARKER_PLUGIN = '''"""A test plugin: the model markernet and the cost marker_kib; appends to a file when imported."""
from collections import OrderedDict

from torch import nn

from ranksearch.models import register_model, scaled_channels
from ranksearch.objectives import Metric, register_cost

with open({marker!r}, "a") as log:
    log.write("imported\\n")


@register_model("markernet")
def markernet(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    c1, c2 = (scaled_channels(c, width) for c in (16, 32))
    block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                            nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, num_classes))
    return nn.Sequential(OrderedDict(block1=block(3, c1), block2=block(c1, c2), head=head))


def marker_kib(model: nn.Module, example) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1024


register_cost(Metric("marker_kib", "marker_kib", "marker_kib", "weights (KiB)", "weights", "minimize", unit="KiB",
                     measure=marker_kib))
'''


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in ``cwd`` (the current folder first on sys.path, as ``python -c`` puts it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def marker_study(tmp_path_factory, tiny_imagefolder) -> SimpleNamespace:
    """A study made with the marker plugin (``run --plugin``; one trial) and its trial exported (``export --plugin``)
    to ``model.pt``; the marker is then cleared: nothing has imported the plugin since."""
    root = tmp_path_factory.mktemp("marker")
    marker = root / "IMPORTED"
    plugin = root / "made" / "marker.py"
    plugin.parent.mkdir()
    plugin.write_text(MARKER_PLUGIN.format(marker=str(marker)))
    made = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--plugin", str(plugin),
                "--model", "markernet", "--objectives", "accuracy,marker_kib", "--trials", "1", "--ranks", "8/32,8/32",
                cwd=root, subprocess=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    export = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", "model.pt", "--plugin", str(plugin),
                  cwd=root, subprocess=True)  # fmt: skip
    assert export.returncode == 0, export.stderr
    marker.unlink()
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    return SimpleNamespace(root=root, marker=marker, plugin=plugin, digest=digest, export=root / "model.pt",
                           storage=f"sqlite:///{root}/studies/smoke.db")  # fmt: skip


def _one_line_naming_the_plugin(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "marker.py" in result.stderr and "--plugin PATH/marker.py" in result.stderr, result.stderr


def test_a_studys_plugin_is_recorded_by_content_and_imported_by_no_command_that_is_not_given_it(marker_study):
    from ranksearch.inspect.dashboard import make_app, study_path
    from ranksearch.study.storage import load_existing_study

    study = optuna.load_study(study_name="smoke", storage=marker_study.storage)
    assert study.user_attrs["config"]["plugins"] == [{"name": "marker.py", "sha256": marker_study.digest}]
    where = marker_study.root
    report = run_cli("report", "--study-name", "smoke", "--out", "report", cwd=where)
    _one_line_naming_the_plugin(report)
    assert "cost 'marker_kib'" in report.stderr
    export = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", "again.pt", cwd=where)
    _one_line_naming_the_plugin(export)
    assert "model 'markernet'" in export.stderr and not (where / "again.pt").exists()
    # the dashboard serves what the study stored: it needs no plugin and imports none
    assert study_path(marker_study.storage, "smoke").startswith("/dashboard/studies/")
    assert callable(make_app(marker_study.storage))
    assert load_existing_study(marker_study.storage, "smoke").user_attrs["config"]["model"] == "markernet"
    assert not marker_study.marker.exists()
    passed = run_cli("report", "--study-name", "smoke", "--out", "report", "--plugin", str(marker_study.plugin),
                  cwd=where, subprocess=True)  # fmt: skip
    assert passed.returncode == 0, passed.stderr
    assert "marker_kib" in (where / "report" / "trials.csv").read_text().splitlines()[0]
    assert marker_study.marker.read_text() == "imported\n"  # passed: imported, once
    marker_study.marker.unlink()


def test_load_model_imports_an_exports_plugin_only_when_passed(marker_study):
    with pytest.raises(UserError) as refused:
        load_model(marker_study.export)
    message = str(refused.value)
    assert "\n" not in message and "model 'markernet'" in message and "plugins=['PATH/marker.py']" in message
    assert not marker_study.marker.exists()
    loaded = _python(
        "import torch\nfrom ranksearch import load_model\n"
        f"model = load_model({str(marker_study.export)!r}, plugins=[{str(marker_study.plugin)!r}])\n"
        "print(list(model(torch.zeros(2, *model.input_spec['size'])).shape))",
        marker_study.root,
    )  # fmt: skip
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[2, 10]", loaded.stderr
    assert marker_study.marker.read_text() == "imported\n"
    marker_study.marker.unlink()


def _edited(export: Path, folder: Path, plugins) -> Path:
    """A copy of ``export`` in ``folder`` whose ``config.plugins`` is ``plugins`` (what an attacker may write)."""
    payload = torch.load(export, map_location="cpu", weights_only=True)
    payload["config"]["plugins"] = plugins
    path = folder / f"edited-{len(list(folder.glob('edited-*.pt')))}.pt"
    torch.save(payload, path)
    return path


def test_an_edited_exports_plugins_are_never_run(marker_study, tmp_path):
    """``config.plugins`` edited to ``this`` (the Zen of Python prints when imported), to a module in the current
    folder and to a planted file's absolute path: load_model imports none of them, and says in one line what the
    model needs. A 0.8.0-style record (a plain path) is matched by file name when its plugin is passed."""
    planted = tmp_path / "elsewhere" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(f"open({str(tmp_path / 'PLANTED')!r}, 'a').write('ran')\n")
    (tmp_path / "cwdmodule.py").write_text(f"open({str(tmp_path / 'CWDMODULE')!r}, 'a').write('ran')\n")
    edits = {"this": ["this"], "cwdmodule": ["cwdmodule"], "planted.py": [str(planted)]}
    paths = {name: str(_edited(marker_study.export, tmp_path, plugins)) for name, plugins in edits.items()}
    builtin = _edited(FIXTURES / "export-v2.pt", tmp_path, ["this", "cwdmodule", str(planted)])  # vgg16: no plugin
    legacy = _edited(marker_study.export, tmp_path, ["/the/old/place/marker.py"])
    code = f"""
import json, sys
from ranksearch import load_model
from ranksearch.utils.errors import UserError
seen = {{}}
for name, path in {paths!r}.items():
    try:
        load_model(path)
        seen[name] = "loaded"
    except UserError as error:
        seen[name] = str(error)
seen["builtin"] = load_model({str(builtin)!r}) is not None  # rebuilt without running any of them
seen["legacy"] = load_model({str(legacy)!r}, plugins=[{str(marker_study.plugin)!r}]) is not None
seen["modules"] = sorted(m for m in ("this", "cwdmodule") if m in sys.modules)
print(json.dumps(seen))
"""
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Beautiful is better than ugly" not in result.stdout + result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["modules"] == [] and not (tmp_path / "PLANTED").exists() and not (tmp_path / "CWDMODULE").exists()
    for name in edits:
        hint = f"plugins=['PATH/{name}']" if name.endswith(".py") else f"plugins=[{name!r}]"
        assert "\n" not in seen[name] and "model 'markernet'" in seen[name] and hint in seen[name], seen[name]
    assert seen["builtin"] and seen["legacy"] and marker_study.marker.read_text() == "imported\n"
    marker_study.marker.unlink()


def test_a_moved_plugin_is_passed_again_and_a_changed_one_is_refused(marker_study, tiny_imagefolder, tmp_path):
    """The moved-plugin row: the study and the export name the plugin by content, so the moved file is accepted by
    ``run`` (resuming) and ``export``; a changed one is refused in one line, by ``run``, ``export`` and
    ``load_model``, before any of its code runs (``export``, ``load_model``)."""
    where, original = marker_study.root, marker_study.plugin
    moved = where / "moved" / "marker.py"
    moved.parent.mkdir()
    shutil.move(original, moved)
    try:
        resumed = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--plugin",
                       str(moved), "--model", "markernet", "--objectives", "accuracy,marker_kib", "--trials", "1",
                       "--ranks", "4/32,4/32", cwd=where, subprocess=True)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        study = optuna.load_study(study_name="smoke", storage=marker_study.storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        exported = run_cli("export", "--study-name", "smoke", "--trial", "1", "--out", "moved.pt", "--plugin",
                        str(moved), cwd=where, subprocess=True)  # fmt: skip
        assert exported.returncode == 0 and (where / "moved.pt").is_file(), exported.stderr
        marker_study.marker.unlink()
        changed = tmp_path / "marker.py"
        changed.write_text(moved.read_text() + "# one more line\n")
        export = run_cli("export", "--study-name", "smoke", "--trial", "1", "--out", "changed.pt", "--plugin",
                      str(changed), cwd=where)  # fmt: skip
        assert export.returncode == 2 and export.stderr.count("\n") == 1, export.stderr
        assert "content changed" in export.stderr and marker_study.digest[:12] in export.stderr
        with pytest.raises(UserError, match="content changed"):
            load_model(marker_study.export, plugins=[str(changed)])
        assert not marker_study.marker.exists()  # refused before it ran
        run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--plugin",
                   str(changed), "--model", "markernet", "--objectives", "accuracy,marker_kib", "--trials", "1",
                   cwd=where, subprocess=True)  # fmt: skip
        assert run.returncode == 2 and "content changed" in run.stderr and run.stderr.count("\n") == 1, run.stderr
        assert len(optuna.load_study(study_name="smoke", storage=marker_study.storage).trials) == 2
    finally:
        shutil.move(moved, original)
        marker_study.marker.unlink(missing_ok=True)
