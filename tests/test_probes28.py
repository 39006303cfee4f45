"""Issue 28's probes (a deploying user's frictions) fixed so far: each failed before its fix."""

from types import SimpleNamespace

import pandas as pd
import pytest
from test_probes24_flags import one_line_error

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.report import plot_title


@pytest.mark.parametrize("command", ["run", "pretrain"])
def test_pretraining_zero_epochs_without_weights_is_refused_before_any_work(tmp_path, tiny_imagefolder, command):
    """It had searched an untrained network without a word."""
    folder = tmp_path / "work"
    folder.mkdir()
    result = run_cli(command, "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder),
                     "--pretrain-epochs", "0", cwd=folder)  # fmt: skip
    one_line_error(result, "--pretrain-epochs 0 would search an untrained network", "--weights FILE")
    assert list(folder.iterdir()) == []


def test_the_report_title_counts_one_pareto_trial_in_the_singular():
    """It read "1 Pareto trials of 2"."""
    rows = pd.DataFrame({"pareto": [True, False]})
    assert plot_title(SimpleNamespace(study_name="b"), rows) == "b: 1 Pareto trial of 2 complete"
    assert plot_title(SimpleNamespace(study_name="b"), pd.DataFrame({"pareto": [True, True]})).startswith(
        "b: 2 Pareto trials of 2")


def test_trials_help_names_the_configs_value_as_the_default(workdir):
    """It said "default 200" where the CPU config sets 20."""
    result = run_cli("run", "--help", cwd=workdir)
    text = " ".join(result.stdout.split())
    assert "default: the config's trials" in text and "default 200" not in text
