"""notebooks/tutorial.ipynb runs top to bottom (nbclient, no jupyter CLI) against a small hand-made study."""

import html
import json
import re
import runpy
import sys
from pathlib import Path

import nbclient
import nbformat
import optuna
import pytest

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "tutorial.ipynb"
MODULES = [f"block{i}" for i in range(1, 6)]
STEP = 1 / 32

# (ranks in 32nds per block, val accuracy, MACs ratio, params ratio): trials 0-3 are the Pareto front;
# trial 4 is beaten by trial 1 (fewer MACs, higher accuracy), trial 5 by trial 2.
TRIALS = [
    ([32, 16, 8, 8, 4], 0.9137, 0.4321, 0.2468),
    ([16, 8, 8, 4, 2], 0.8912, 0.2109, 0.1357),
    ([8, 4, 4, 2, 1], 0.8427, 0.1123, 0.0624),
    ([2, 2, 1, 1, 1], 0.7105, 0.0456, 0.0213),
    ([24, 12, 12, 8, 8], 0.8765, 0.3579, 0.2010),
    ([8, 8, 4, 4, 4], 0.8013, 0.1777, 0.0999),
]
PARETO = [0, 1, 2, 3]
BASELINE = {"val_accuracy": 0.9234, "test_accuracy": 0.9187, "macs": 19_907_840, "params": 921_018}


def make_study(storage: str, name: str) -> None:
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
    distribution = optuna.distributions.FloatDistribution(STEP, 1.0, step=STEP)
    for ranks, accuracy, macs_ratio, params_ratio in TRIALS:
        study.add_trial(
            optuna.trial.create_trial(
                params={f"rank_{m}": k * STEP for m, k in zip(MODULES, ranks, strict=True)},
                distributions={f"rank_{m}": distribution for m in MODULES},
                values=[accuracy, float(round(macs_ratio * BASELINE["macs"]))],
                user_attrs={"macs_ratio": macs_ratio, "params_ratio": params_ratio},
            )
        )
    study.set_user_attr("baseline", BASELINE)
    assert sorted(t.number for t in study.best_trials) == PARETO


def kernel_spec(root: Path) -> str:
    """A kernelspec that runs this very interpreter, so no user-level 'python3' spec can stand in for it."""
    name = "ranksearch-test"
    folder = root / "kernels" / name
    folder.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (folder / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    return name


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                parts.append(output.data.get("text/plain", ""))
                parts.append(output.data.get("text/html", ""))
    return "\n".join(parts)


def pareto_table(nb: nbformat.NotebookNode) -> dict[int, list[str]]:
    """The rows of the displayed Pareto table (its HTML form): trial number -> cell texts."""
    tables = [
        o.data["text/html"] for c in nb.cells for o in c.get("outputs", [])
        if "text/html" in o.get("data", {}) and "val_accuracy" in o.data["text/html"]
    ]  # fmt: skip
    assert len(tables) == 1, f"expected one Pareto table, found {len(tables)}"
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", tables[0], flags=re.S):
        cells = [html.unescape(c).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, flags=re.S)]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    return rows


def image_count(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def execute(nb: nbformat.NotebookNode, kernel_name: str) -> None:
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=kernel_name, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()


@pytest.fixture
def jupyter_env(tmp_path, monkeypatch) -> str:
    """Kernel files, IPython profile and matplotlib cache in tmp_path; ranksearch importable in the kernel."""
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return kernel_spec(tmp_path / "jupyter")


def test_notebook_is_generated_from_its_script():
    """The stored notebook is exactly what notebooks/make_tutorial.py writes, with no outputs."""
    script = runpy.run_path(str(NOTEBOOKS / "make_tutorial.py"))
    assert NOTEBOOK.read_text() == script["render"](), "run python notebooks/make_tutorial.py"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_and_plots_the_study(tmp_path, monkeypatch, jupyter_env):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    make_study(storage, "tiny-study")
    monkeypatch.setenv("RANKSEARCH_STUDY_STORAGE", storage)
    monkeypatch.setenv("RANKSEARCH_STUDY_NAME", "tiny-study")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    execute(nb, jupyter_env)  # raises CellExecutionError on the first failing cell (asserts included)

    text = outputs_text(nb)
    assert f"KERNEL {sys.executable}" in text  # the kernel ran in this interpreter
    assert "No study to show" not in text
    assert "Pareto front: 4 of 6 complete trials" in text
    table = pareto_table(nb)
    assert list(table) == sorted(PARETO, key=lambda n: TRIALS[n][2])  # front trials only, by MACs
    for number, cells in table.items():  # ranks as k/32, val accuracy, MACs, MACs ratio, params ratio
        ranks, accuracy, macs_ratio, params_ratio = TRIALS[number]
        macs = f"{round(macs_ratio * BASELINE['macs'])}"
        numbers = [f"{accuracy:.4f}", macs, f"{macs_ratio:.4f}", f"{params_ratio:.4f}"]
        assert cells == [*(f"{k}/32" for k in ranks), *numbers]
    assert image_count(nb) == 2  # the error-vs-rank plot and the Pareto plot


@pytest.mark.slow
def test_notebook_without_a_study_says_how_to_make_one(tmp_path, monkeypatch, jupyter_env):
    monkeypatch.setenv("RANKSEARCH_STUDY_STORAGE", f"sqlite:///{tmp_path / 'missing.db'}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    section5 = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## 5."))
    nb.cells = [nb.cells[first_code], *nb.cells[section5:]]  # the imports, then section 5 alone
    execute(nb, jupyter_env)
    text = outputs_text(nb)
    assert "No study to show" in text and "missing.db" in text
    assert "python -m ranksearch run --trials 20 --config configs/cpu.yaml" in text
    assert not (tmp_path / "missing.db").exists()  # looking did not create an empty database
