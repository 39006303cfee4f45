"""Issue 24's probes of config and flag checks (W4, W5, U16 and friends, T, H3, YAML): each misbehaved before its
fix; each refusal is one line, exit 2, before any work (no study, no baseline where the row says so)."""

import argparse
import os

import optuna
import pytest

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.objectives.budget import canonical_budget
from ranksearch.study.config import CONFIG_MAX_BYTES, load_config
from ranksearch.utils.errors import UserError

SMOKE = ("--config", str(SMOKE_CONFIG))


def one_line_error(result, *fragments, after_baseline: bool = False) -> str:
    """The single error line of a refused command (exit 2, no traceback), holding every fragment; the only line on
    stderr, or the one after the baseline's lines (``after_baseline``: refused once the baseline is known)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if after_baseline:
        assert all(line.startswith("baseline: ") for line in lines[:-1]), result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("ranksearch: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def files_under(folder) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def smoke_with(tmp_path, text: str, name: str = "c.yaml"):
    """The smoke config with ``text``'s lines (``key: value``) in place of its own lines of those keys, as a file
    in ``tmp_path``."""
    keys = tuple(line.partition(":")[0] + ":" for line in text.splitlines())
    kept = [line for line in SMOKE_CONFIG.read_text().splitlines(keepends=True) if not line.startswith(keys)]
    path = tmp_path / name
    path.write_text("".join(kept) + text)
    return path


# ----- W4: a latency budget no model meets -----------------------------------------------------------------------


def test_w4_a_latency_budget_below_every_model_is_refused_before_the_study_is_written(workdir, tiny_imagefolder):
    """``--budget latency=0.5``: the first trial failed (the factor convs' overhead keeps every decomposed smoke
    model above it), exit 1, and the study was written, locked to that budget."""
    result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--budget", "latency=0.05", "--trials", "1",
                     cwd=workdir)  # fmt: skip
    one_line_error(
        result, "budget latency=0.05 is below the cheapest model's latency", "raise it", after_baseline=True
    )
    assert not (workdir / "studies" / "smoke.db").exists()
    assert not (workdir / "studies" / "smoke-weights").exists()


def test_w4_the_parent_of_workers_checks_it_too(workdir, tiny_imagefolder):
    """``run --workers 2``: the parent runs no trial (no meter of the trials), but writes the study."""
    result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--budget", "latency=0.05", "--trials", "2",
                     "--workers", "2", cwd=workdir, subprocess=True)  # fmt: skip
    one_line_error(result, "budget latency=0.05 is below the cheapest model's latency", after_baseline=True)
    assert not (workdir / "studies" / "smoke.db").exists()


# ----- W5: budgets compared by value ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["macs=0.3", "macs=0.30", "macs=.3", " macs=0.3", "macs=3e-1"])
def test_w5_a_budget_has_one_spelling_per_value(text):
    assert canonical_budget(text) == "macs=0.3"
    assert load_config(None, {"budget": text}).budget == "macs=0.3"


def test_w5_a_budget_study_resumes_with_the_same_budget_spelt_otherwise(workdir, tiny_imagefolder):
    """``macs=0.30`` and ``macs=.3`` on a ``macs=0.3`` study were refused as "another config"; a study that
    recorded the user's spelling (before the fix) resumes too."""
    run = ("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "1", "--budget")
    assert run_cli(*run, "macs=0.3", cwd=workdir).returncode == 0
    for text in ("macs=0.30", "macs=.3"):
        result = run_cli(*run, text, cwd=workdir)
        assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    assert study.user_attrs["config"]["budget"] == "macs=0.3" and len(study.trials) == 3
    study.set_user_attr("config", {**study.user_attrs["config"], "budget": "macs=.30"})  # as 0.8.0 recorded it
    result = run_cli(*run, "macs=0.3", cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run_cli(*run, "macs=0.31", cwd=workdir)
    one_line_error(result, "another config", "'macs=0.3' -> 'macs=0.31'", after_baseline=True)


# ----- U16: flags the run cannot use ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,config_text,fragments",
    [
        (("--pruner", "none"), "", ("--pruner applies to budget mode only",)),
        ((), "pruner: halving\n", ("config key pruner applies to budget mode only",)),
        (("--latency-batch", "4"), "", ("--latency-batch applies when latency is measured",)),
        (("--latency-batch", "2", "--objectives", "accuracy,params"), "", ("--latency-batch applies",)),
        ((), "latency_batch: 8\n", ("config key latency_batch applies when latency is measured",)),
    ],
)
def test_u16_a_flag_the_run_does_not_use_is_refused_before_any_work(tmp_path, tiny_imagefolder, args, config_text,
                                                                     fragments):  # fmt: skip
    """``--pruner`` without ``--budget`` and ``--latency-batch`` without latency were accepted, recorded in the
    study, and refused every later run without them."""
    config = smoke_with(tmp_path, config_text)
    result = run_cli("run", "--config", str(config), "--data-dir", str(tiny_imagefolder), *args, cwd=tmp_path)
    one_line_error(result, *fragments)
    assert files_under(tmp_path) == [config]


def test_u16_the_same_keys_pass_where_they_are_used():
    assert load_config(None, {"pruner": "none", "budget": "macs=0.3"}).pruner == "none"
    assert load_config(None, {"latency_batch": 4, "budget": "latency=0.5"}).latency_batch == 4
    assert load_config(None, {"latency_batch": 4, "objectives": ["accuracy", "latency"]}).latency_batch == 4


@pytest.mark.parametrize(
    "args,flags",
    [
        (("--trials", "3"), "--trials"),
        (("--ranks", "8/32,8/32,8/32,8/32,8/32"), "--ranks"),
        (("--warm-start", "uniform"), "--warm-start"),
        (("--trials", "3", "--warm-start", "none"), "--trials, --warm-start"),
        (("--sampler", "tpe"), "--sampler"),
        (("--latency-batch", "4", "--objectives", "accuracy,latency"), "--latency-batch"),
    ],
)
def test_u16_sensitivity_refuses_run_flags_it_would_ignore(tmp_path, tiny_imagefolder, args, flags):
    """``sensitivity --trials 3 --ranks ... --warm-start ...`` ran and ignored them."""
    result = run_cli("sensitivity", *SMOKE, "--data-dir", str(tiny_imagefolder), *args, cwd=tmp_path)
    one_line_error(result, f"sensitivity does not use {flags}")
    assert files_under(tmp_path) == []


def test_u16_sensitivity_hides_them_from_help_and_its_workers_still_take_run_flags(tmp_path):
    from ranksearch.cli import _check_sensitivity_flags, build_parser

    shown = run_cli("sensitivity", "--help", cwd=tmp_path).stdout
    assert "--finetune-steps" in shown and not any(f in shown for f in ("--trials", "--warm-start", "--ranks "))
    # a worker of `run --warm-start sensitivity --workers 2` gets run's command line, and its quota as --trials
    args = build_parser().parse_args(["sensitivity", "--trials", "3", "--warm-start", "sensitivity", "--worker",
                                      "abc:0:3:1"])  # fmt: skip
    _check_sensitivity_flags(args)
    with pytest.raises(UserError, match="--trials"):
        _check_sensitivity_flags(argparse.Namespace(**{**vars(args), "worker": None}))


@pytest.mark.parametrize("text", ["garbage", "a:b:c:d", "x:1:2", "x:-1:2:0", ":0:1:0", "x:0:1:0:9", "1" * 5000])
def test_u16_run_worker_garbage_is_one_line(tmp_path, tiny_imagefolder, text):
    """``run --worker garbage``: a traceback (ValueError from str.split's unpacking)."""
    result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--worker", text, cwd=tmp_path)
    one_line_error(result, "--worker", "internal to `run --workers N`")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "config_text,args,fragment",
    [
        ("enqueue_ranks: [[0.25, 0.25]]\n", (), "config key enqueue_ranks needs 5 values"),
        ("enqueue_ranks: [[0.3, 0.25, 0.25, 0.25, 0.25]]\n", (), "config key enqueue_ranks: rank 0.3 is off the grid"),
        ("", ("--ranks", "8/32,8/32"), "--ranks needs 5 values"),
        ("enqueue_ranks: [[0.25, 0.25]]\n", ("--ranks", "8/32,8/32,8/32"), "--ranks needs 5 values"),
    ],
)
def test_u16_enqueued_rank_errors_name_where_the_ranks_came_from(tmp_path, tiny_imagefolder, config_text, args,
                                                                 fragment):  # fmt: skip
    """A config file's ``enqueue_ranks`` errors spoke of ``--ranks``, a flag the user never typed."""
    config = smoke_with(tmp_path, config_text)
    result = run_cli("run", "--config", str(config), "--data-dir", str(tiny_imagefolder), *args, cwd=tmp_path)
    line = one_line_error(result, fragment)
    assert ("--ranks" in line) == ("--ranks" in args)
    assert files_under(tmp_path) == [config]


def test_u16_an_enqueued_vector_over_the_budget_names_the_config_key(workdir, tiny_imagefolder):
    config = smoke_with(workdir, "enqueue_ranks: [[1.0, 1.0, 1.0, 1.0, 1.0]]\n")
    result = run_cli("run", "--config", str(config), "--data-dir", str(tiny_imagefolder), "--budget", "macs=0.2",
                     cwd=workdir)  # fmt: skip
    line = one_line_error(
        result, "config key enqueue_ranks vector 32/32,", "over the budget macs=0.2", after_baseline=True
    )
    assert "--ranks" not in line and not (workdir / "studies" / "smoke.db").exists()


# ----- T: float fields without an upper bound gave tracebacks --------------------------------------------------------


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("pretrain_lr: 1.0e+30\n", "pretrain_lr must be in (0, 10.0], got 1e+30"),
        ("weight_decay: 1.0e+300\n", "weight_decay must be in [0, 1.0], got 1e+300"),
        ("finetune_lr: 1.0e+30\n", "finetune_lr must be in (0, 10.0], got 1e+30"),
        ("distill_temperature: 1.0e+30\n", "distill_temperature must be in (0, 100.0], got 1e+30"),
        ("pretrain_lr: 1e30\n", "pretrain_lr must be in (0, 10.0], got 1e+30"),  # YAML 1.2's float, now read as one
    ],
)
def test_t_a_huge_rate_or_decay_is_refused_before_any_work(tmp_path, tiny_imagefolder, text, fragment):
    """``pretrain_lr: 1.0e+30``: a TrainingDiverged traceback after pretraining; ``weight_decay: 1.0e+300``: torch's
    "value cannot be converted to type float without overflow"."""
    config = smoke_with(tmp_path, text)
    one_line_error(run_cli("pretrain", "--config", str(config), "--data-dir", str(tiny_imagefolder), cwd=tmp_path),
                   fragment)  # fmt: skip
    assert files_under(tmp_path) == [config]


def test_t_a_diverged_pretraining_is_one_line(tmp_path, tiny_imagefolder, monkeypatch):
    """A rate within the bounds may still diverge on some data: the baseline's TrainingDiverged was a traceback."""
    from ranksearch.train import baseline
    from ranksearch.train.loops import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged("training loss became nan (try a lower learning rate)")

    monkeypatch.setattr(baseline, "pretrain", diverge)
    result = run_cli("pretrain", *SMOKE, "--data-dir", str(tiny_imagefolder), cwd=tmp_path)
    one_line_error(result, "baseline pretraining diverged", "lower learning rate", "pretrain_lr is 0.05",
                   after_baseline=True)  # fmt: skip
    assert not any(p.suffix == ".pt" for p in files_under(tmp_path))


# ----- H3 and YAML: what a config file may be ------------------------------------------------------------------------


def test_h3_a_config_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """``--config /dev/zero``: no output, 24 GB of memory, then the kernel killed it."""
    one_line_error(run_cli("run", "--config", "/dev/zero", cwd=tmp_path), "config /dev/zero is not a regular file")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    one_line_error(run_cli("run", "--config", str(fifo), cwd=tmp_path), "is not a regular file")  # never opened
    one_line_error(run_cli("run", "--config", str(tmp_path), cwd=tmp_path), "is not a regular file")


def test_h3_a_config_larger_than_the_cap_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (CONFIG_MAX_BYTES // 10 + 1))  # comments only: read as an empty config before
    one_line_error(run_cli("run", "--config", str(big), cwd=tmp_path), f"over the {CONFIG_MAX_BYTES:,} a config")


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("pretrain_lr: 1e-3\n", "pretrain_lr", 0.001),
        ("weight_decay: 5E-4\n", "weight_decay", 0.0005),
        ("distill_temperature: 4.0e0\n", "distill_temperature", 4.0),
    ],
)
def test_yaml_floats_without_a_dot_or_an_exponent_sign_are_floats(tmp_path, text, key, value):
    """``1e30`` (and ``1.0e30``) were text to PyYAML's YAML 1.1 reader, refused as "must be float" with no hint."""
    assert getattr(load_config(smoke_with(tmp_path, text)), key) == value


def test_yaml_a_quoted_number_says_to_drop_the_quotes(tmp_path):
    result = run_cli("run", "--config", str(smoke_with(tmp_path, 'pretrain_lr: "0.1"\n')), cwd=tmp_path)
    one_line_error(result, "'pretrain_lr' must be float, got '0.1'", "without quotes")


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("finetune_steps: 3\nfinetune_steps: 5\n", "key 'finetune_steps' is set twice (lines 1 and 2); keep one"),
        ("{seed: 1, seed: 2}\n", "key 'seed' is set twice (line 1)"),
    ],
)
def test_yaml_a_duplicate_key_is_refused_with_its_lines(tmp_path, text, fragment):
    """A duplicate key was accepted, the last one winning silently."""
    (tmp_path / "c.yaml").write_text(text)
    one_line_error(run_cli("run", "--config", "c.yaml", cwd=tmp_path), "config c.yaml is not valid YAML", fragment)


def test_yaml_merge_keys_and_anchors_are_no_duplicates(tmp_path):
    (tmp_path / "c.yaml").write_text("<<: {seed: 3, split_seed: 4}\nseed: 5\nwarm_start: &none []\nplugins: *none\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.seed, config.split_seed, config.warm_start, config.plugins) == (5, 4, [], [])
