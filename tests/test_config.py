import random

import pytest

from conftest import SMOKE_CONFIG
from ranksearch.study.config import Config, baseline_key, load_config, search_fields
from ranksearch.utils.errors import UserError


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
        ("finetune_lr: .inf\n", "finetune_lr must be a finite number, got inf"),
        ("pretrain_lr: .nan\n", "pretrain_lr must be a finite number, got nan"),
        ("distill_temperature: -.inf\n", "distill_temperature must be a finite number"),
        ("rank_min: .inf\n", "rank_min must be a finite number"),
        ("width: 1" + "0" * 400 + "\n", "'width' must be a finite float"),  # an int too large for a float
        ("enqueue_ranks: [[.nan, 0.25, 0.25, 0.25, 0.25]]\n", "enqueue_ranks must hold ranks k/32"),
        ("width: 16.5\n", r"width must be in \(0, 16\], got 16.5"),
        ("momentum: 1.0\n", r"momentum must be in \[0, 1\), got 1.0"),
        ("weight_decay: -0.1\n", r"weight_decay must be in \[0, 1.0\], got -0.1"),
        ("label_smoothing: 1\n", r"label_smoothing must be in \[0, 1\)"),
        ("distill_temperature: 0\n", r"distill_temperature must be in \(0, 100.0\]"),
        ("distill_weight: 1.5\n", r"distill_weight must be in \[0, 1\]"),
        ("val_size: 10000000000000\n", r"val_size must be in \[1, 2147483647\]"),
        ("batch_size: 0\n", "batch_size must be in"),
        ("finetune_steps: -1\n", r"finetune_steps must be in \[0, "),
        ("seed: 4294967296\n", r"seed must be in \[0, 4294967295\], got 4294967296"),
        ("split_seed: -1\n", "split_seed must be in"),
        ("storage: 3\n", "'storage' must be text or null, got 3"),
        ("1: 2\nwidht: 3\n", "unknown config key.*'widht', 1"),
        ("width: [" * 2000 + "]" * 2000 + "\n", "nests too deeply"),
    ],
)
def test_bad_config_values_are_user_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_binary_file_is_a_user_error(tmp_path, seed):
    path = tmp_path / "c.yaml"
    path.write_bytes(random.Random(seed).randbytes(300))
    with pytest.raises(UserError, match="is not UTF-8 text .*pass a YAML file"):
        load_config(path)


def test_every_range_accepts_its_edges(tmp_path):
    edges = {
        "width": 16.0, "seed": 2**32 - 1, "split_seed": 0, "momentum": 0.0, "weight_decay": 0.0,
        "label_smoothing": 0.0, "distill_weight": 1.0, "val_size": 2**31 - 1, "finetune_steps": 0,
    }  # fmt: skip
    assert load_config(None, edges).to_dict().items() >= edges.items()


def test_search_fields_and_baseline_key_ignore_run_control():
    a, b = Config(), Config(trials=3, device="cpu", data_dir="/elsewhere", study_name="x")
    data = {"train": 45000, "val": 5000}  # what baseline_key is told about the data (opaque to it)
    assert search_fields(a) == search_fields(b) and baseline_key(a, data) == baseline_key(b, data)
    assert baseline_key(Config(width=0.5), data) != baseline_key(a, data)
    assert baseline_key(a, {**data, "val": 4999}) != baseline_key(a, data)
    assert baseline_key(Config(finetune_steps=1), data) == baseline_key(a, data)  # fine-tuning: not the baseline
    assert search_fields(Config(finetune_steps=1)) != search_fields(a)
