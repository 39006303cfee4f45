import pytest

from conftest import SMOKE_CONFIG
from ranksearch.config import Config, baseline_key, load_config, search_fields
from ranksearch.errors import UserError


def test_defaults_are_the_full_size_job_and_files_override_them(tmp_path):
    assert load_config(None) == Config()
    assert Config().width == 1.0 and Config().val_size == 5000 and Config().trials == 200
    smoke = load_config(SMOKE_CONFIG, {"trials": 7, "seed": None})
    assert smoke.width == 0.0625 and smoke.trials == 7 and smoke.seed == 0


def test_every_shipped_config_loads():
    for path in sorted(SMOKE_CONFIG.parent.glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("widht: 0.5\n", "unknown config key"),
        ("rank_min: 0.1\n", "off the grid"),
        ("rank_min: 0.5\nrank_max: 0.25\n", "above rank_max"),
        ("enqueue_ranks: [[0.25, 0.3, 0.25, 0.25, 0.25]]\n", "off the grid"),
        ("sampler: grid\n", "sampler must be one of"),
        ("trials: 0\n", "at least 1"),
        ("width: fat\n", "must be float"),
        ("- a list\n", "mapping"),
    ],
)
def test_bad_config_values_are_user_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(path)


def test_search_fields_and_baseline_key_ignore_run_control():
    a, b = Config(), Config(trials=3, device="cpu", data_dir="/elsewhere", study_name="x")
    assert search_fields(a) == search_fields(b) and baseline_key(a) == baseline_key(b)
    assert baseline_key(Config(width=0.5)) != baseline_key(a)
    assert baseline_key(Config(finetune_steps=1)) == baseline_key(a)  # fine-tuning does not touch the baseline
    assert search_fields(Config(finetune_steps=1)) != search_fields(a)
