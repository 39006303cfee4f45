"""A study and an export written by ranksearch 0.8.0 (tests/data/make_v080.sh) still open: ``load_model`` gives
0.8.0's logits, ``report`` and the dashboard read the study, ``export`` rebuilds a trial from the weights 0.8.0
kept, and ``run`` adds trials to it."""

import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from test_dashboard import get_json

from conftest import SMOKE_CONFIG, run_cli
from ranksearch import load_model
from ranksearch.inspect.dashboard import make_app

FIXTURES = Path(__file__).parent / "data"


@pytest.fixture
def old_study(tmp_path) -> Path:
    """A working folder holding 0.8.0's study where 0.8.0 wrote it (studies/smoke.db, its weights beside it)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(FIXTURES / "study-v080.db", studies / "smoke.db")
    shutil.copytree(FIXTURES / "study-v080-weights", studies / "smoke-weights")
    return tmp_path


def test_a_080_export_loads_to_the_logits_080_gave():
    reference = torch.load(FIXTURES / "export-v4-reference.pt", weights_only=True)
    with torch.no_grad():
        logits = load_model(FIXTURES / "export-v4.pt")(reference["images"])
    torch.testing.assert_close(logits, reference["logits"])


def test_report_and_the_dashboard_read_a_080_study(old_study):
    result = run_cli("report", "--study-name", "smoke", "--out", "report", cwd=old_study)
    assert result.returncode == 0, result.stderr
    assert "study 'smoke': 2 trials (2 complete, 0 failed)" in result.stdout
    rows = (old_study / "report" / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,COMPLETE,8,8,8,8,8,0.2,180288")
    app = make_app(f"sqlite:///{old_study / 'studies' / 'smoke.db'}")
    (summary,) = get_json(app, "/api/studies")["study_summaries"]
    detail = get_json(app, f"/api/studies/{summary['study_id']}")
    assert summary["study_name"] == "smoke" and len(detail["trials"]) == 2


def test_export_rebuilds_a_080_trial_from_its_kept_weights(old_study, tiny_imagefolder):
    result = run_cli("export", "--study-name", "smoke", "--trial", "0", "--data-dir", str(tiny_imagefolder),
                     "--out", "m.pt", cwd=old_study)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trial 0 rebuilt (weights kept with the study)" in result.stdout
    reference = torch.load(FIXTURES / "export-v4-reference.pt", weights_only=True)
    with torch.no_grad():
        logits = load_model(old_study / "m.pt")(reference["images"])
    torch.testing.assert_close(logits, reference["logits"])  # the same weights as 0.8.0's own export


def test_run_adds_trials_to_a_080_study(old_study, tiny_imagefolder):
    """With 0.8.0's search settings: since then ``rank_spread`` became 4 (0.8.0 had no limit, 32)."""
    config = yaml.safe_load(SMOKE_CONFIG.read_text()) | {"rank_spread": 32}
    (old_study / "v080.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("run", "--config", "v080.yaml", "--data-dir", str(tiny_imagefolder), "--trials", "1",
                     cwd=old_study)  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{old_study / 'studies' / 'smoke.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
