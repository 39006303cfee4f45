"""Issue 24, item 4 (one study, one config): a run claims its study's setup atomically, so that a second run
started at the same moment either matches it or is refused with one line before it asks for a trial (W1, D4);
SQLite URLs that do not name a plain file are refused before any work (D1, W2)."""

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import optuna
import pytest
from test_cli import assert_one_line_error
from test_join import start_together

from conftest import REPO, SMOKE_CONFIG, run_cli
from ranksearch.study.config import Config, load_config
from ranksearch.study.storage import CLAIM, claim_study, create_or_load, open_storage, record_setup, release_claim
from ranksearch.utils.errors import UserError

SMOKE = ("--config", str(SMOKE_CONFIG))


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("sqlite:///file::memory:?cache=shared&uri=true", "in-memory database"),
        ("sqlite:///file:mem1?mode=memory&uri=true", "in-memory database"),
        ("sqlite:///studies/st5.db?mode=ro&uri=true", "query parameters"),
        ("sqlite:///file:studies/st5.db", "file: URI"),
    ],
)
def test_a_sqlite_url_that_is_not_a_plain_file_is_refused_before_any_work(url, what, tmp_path, tiny_imagefolder):
    """D1: the in-memory URI forms exited 0 with nothing saved, a heartbeat traceback and orphan weights folders.
    W2: ``?mode=ro&uri=true`` wrote a file named ``st5.db?mode=ro``, which no compatibility check ever saw."""
    (tmp_path / "studies").mkdir()
    for extra in ((), ("--finetune-steps", "5")):  # W2: then the same with another config
        result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--storage", url, "--trials", "1",
                         *extra, cwd=tmp_path)  # fmt: skip
        assert_one_line_error(result, what, repr(url))
    report = run_cli("report", "--study-name", "smoke", "--storage", url, "--out", "r", cwd=tmp_path)
    assert_one_line_error(report, what)
    assert [p.name for p in tmp_path.iterdir()] == ["studies"] and list((tmp_path / "studies").iterdir()) == []


def smoke_config(url: str, **overrides) -> Config:
    return load_config(SMOKE_CONFIG, {"storage": url, "study_name": "smoke", **overrides})


def fresh_study(url: str) -> optuna.Study:
    return create_or_load(smoke_config(url))


def claim_of(url: str) -> dict:
    return optuna.load_study(study_name="smoke", storage=url).user_attrs[CLAIM]


def claim_at_once(url: str, configs: list[Config]) -> list[str]:
    """``claim_study`` from one thread per config, each with its own storage, released together; each thread's
    outcome: "won" or the UserError's text."""
    fresh_study(url)
    studies = [optuna.load_study(study_name="smoke", storage=open_storage(url, 60)) for _ in configs]
    barrier = threading.Barrier(len(configs))
    outcomes = [""] * len(configs)

    def claim(index: int) -> None:
        barrier.wait()
        try:
            claim_study(studies[index], configs[index])
            outcomes[index] = "won"
        except UserError as error:
            outcomes[index] = str(error)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return outcomes


def setup(config: Config) -> tuple[int, int]:
    return config.finetune_steps, config.heartbeat_seconds


def assert_one_setup_won(url: str, configs: list[Config], outcomes: list[str], refusal: str) -> None:
    """Every claim of one setup won, every claim of the other was refused, and the study records the winner's."""
    won = {setup(config) for config, outcome in zip(configs, outcomes, strict=True) if outcome == "won"}
    assert len(won) == 1, outcomes
    winner = won.pop()
    for config, outcome in zip(configs, outcomes, strict=True):
        if setup(config) == winner:
            assert outcome == "won", outcome
        else:
            assert refusal in outcome and "\n" not in outcome, outcome
    claim = claim_of(url)
    assert (claim["config"]["finetune_steps"], claim["heartbeat_seconds"]) == winner
    assert len(claim["processes"]) == outcomes.count("won")  # each winner joined it (no trials yet)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_of_two_setups_claimed_at_once_exactly_one_wins(engine, request, tmp_path):
    """W1's core: whatever the interleaving, the study gets one setup; the other runs are refused."""
    url = f"sqlite:///{tmp_path / 'race.db'}" if engine == "sqlite" else request.getfixturevalue("postgres_url")
    configs = [smoke_config(url, finetune_steps=3 + 2 * (i % 2)) for i in range(6)]
    outcomes = claim_at_once(url, configs)
    assert_one_setup_won(url, configs, outcomes, "was made with another config (finetune_steps: ")


def test_of_two_heartbeats_claimed_at_once_exactly_one_wins(tmp_path):
    """D4's core: a run with another heartbeat never joins a study another run is measuring in."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    configs = [smoke_config(url, heartbeat_seconds=(60, 1)[i % 2]) for i in range(4)]
    outcomes = claim_at_once(url, configs)
    assert_one_setup_won(url, configs, outcomes, "runs with --heartbeat-seconds ")


CLAIM_AND_EXIT = textwrap.dedent("""
    import sys
    from ranksearch.study.config import load_config
    from ranksearch.study.storage import claim_study, create_or_load

    config = load_config(sys.argv[1], {"storage": sys.argv[2], "study_name": "smoke", "finetune_steps": 5})
    claim_study(create_or_load(config), config)  # then ends without a trial and without releasing (as kill -9)
""")


def test_a_claim_without_trials_is_reconfigured_only_when_no_run_is_on_it(tmp_path):
    """A study with no trials may be re-configured (nothing was measured), but not while a live run holds it."""
    url = f"sqlite:///{tmp_path / 'claim.db'}"
    ours = fresh_study(url)
    claim_study(ours, smoke_config(url))  # a live run (this process) that has not asked for a trial yet
    other = fresh_study(url)
    with pytest.raises(UserError, match="another config"):
        claim_study(other, smoke_config(url, finetune_steps=5))
    release_claim(ours)  # that run ended
    claim_study(other, smoke_config(url, finetune_steps=5))
    assert claim_of(url)["config"]["finetune_steps"] == 5

    dead = tmp_path / "dead.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", CLAIM_AND_EXIT, str(SMOKE_CONFIG), f"sqlite:///{dead}"], check=True,
                   env=env, timeout=120)  # fmt: skip
    url = f"sqlite:///{dead}"
    claim_study(fresh_study(url), smoke_config(url))  # its process is gone: re-configured
    assert claim_of(url)["config"]["finetune_steps"] == 3


def test_a_claim_with_trials_is_never_reconfigured(tmp_path):
    url = f"sqlite:///{tmp_path / 'claim.db'}"
    study = fresh_study(url)
    claim_study(study, smoke_config(url))
    study.enqueue_trial({"rank_x": 0.5})  # a trial of that setup
    release_claim(study)
    with pytest.raises(UserError, match="another config"):
        claim_study(fresh_study(url), smoke_config(url, finetune_steps=5))
    claim_study(fresh_study(url), smoke_config(url))  # the same setup joins
    assert claim_of(url)["config"]["finetune_steps"] == 3


# A `run` whose study appears, made and claimed by another run, while it prepares (after it found no study): the
# moment two runs started together meet. The other run's study is a file the test prepared, moved into place.
APPEARS = textwrap.dedent("""
    import os
    import ranksearch.run as run

    prepare = run.prepare_run

    def prepare_run(config, worker=None):
        prepared = prepare(config, worker)
        os.replace(os.environ["OTHER_STUDY"], "studies/smoke.db")
        return prepared

    run.prepare_run = prepare_run
""")


def other_run_in_flight(tmp_path, measuring: bool, **overrides) -> optuna.Study:
    """The other run: a study claimed for the smoke config with ``overrides`` by a live process (this one); when
    ``measuring``, with its setup recorded and a trial running and beating. Its file is ``tmp_path / other.db``."""
    url = f"sqlite:///{tmp_path / 'other.db'}"
    config = smoke_config(url, **overrides)
    study = create_or_load(config)
    claim_study(study, config)
    if measuring:
        with warnings.catch_warnings():  # "experimental" metric names; a heartbeat outside optimize (as a run's)
            warnings.simplefilter("ignore")
            record_setup(study, config)
            running = study.ask()
        study._storage.record_heartbeat(running._trial_id)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(APPEARS)
    return study


def assert_refused(result, *fragments) -> None:
    """Exit 2 with one error line (after the baseline's lines of a run that met the other run late), no traceback."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ranksearch")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr and all(fragment in errors[0] for fragment in fragments), result.stderr


def run_as_the_other_appears(workdir, tmp_path, tiny_imagefolder, *flags):
    os.environ["OTHER_STUDY"] = str(tmp_path / "other.db")
    try:
        return run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "1", *flags, cwd=workdir,
                       pythonpath=tmp_path / "hook")  # fmt: skip
    finally:
        del os.environ["OTHER_STUDY"]


def test_a_run_with_another_heartbeat_meeting_a_live_run_fails_none_of_its_trials(workdir, tmp_path_factory,
                                                                                  tiny_imagefolder):  # fmt: skip
    """D4: the second run (``--heartbeat-seconds 1``) failed the first's live trial about 2 s in, and the study
    then recorded heartbeat 1."""
    side = tmp_path_factory.mktemp("other")
    other_run_in_flight(side, measuring=True)
    result = run_as_the_other_appears(workdir, side, tiny_imagefolder, "--heartbeat-seconds", "1")
    assert_refused(result, "runs with --heartbeat-seconds 60")
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir / 'studies' / 'smoke.db'}")
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # not failed by the refused run's heartbeat
    assert study.user_attrs["heartbeat_seconds"] == 60 and study.user_attrs[CLAIM]["heartbeat_seconds"] == 60


def test_a_run_with_another_config_meeting_a_live_run_is_refused(workdir, tmp_path_factory, tiny_imagefolder):
    """W1: two runs started together with other --finetune-steps both exited 0 and mixed their trials. Here the
    other run has claimed the study and not asked for its first trial yet."""
    side = tmp_path_factory.mktemp("other")
    other_run_in_flight(side, measuring=False, finetune_steps=5)
    result = run_as_the_other_appears(workdir, side, tiny_imagefolder)
    assert_refused(result, "was made with another config (finetune_steps: 5 -> 3)")
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir / 'studies' / 'smoke.db'}")
    assert study.trials == [] and "config" not in study.user_attrs
    assert study.user_attrs[CLAIM]["config"]["finetune_steps"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--finetune-steps", "5"), ("--heartbeat-seconds", "1")])
def test_two_runs_started_together_with_other_setups_leave_one_setup(flags, workdir, tiny_imagefolder):
    """W1 and D4 as the probe ran them: whichever run is first, the other exits 2 with one line and the study's
    trials are all the first's, none failed."""

    def command(extra):
        run = ["run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "1", *extra]
        return [sys.executable, "-m", "ranksearch", *run]

    commands = iter([command(()), command(flags)])
    processes = start_together(2, lambda ready, go: ["sh", "-c", f"touch {ready}; exec \"$@\"", "-", *next(commands)],
                               workdir)  # fmt: skip
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    winner = 0 if results[0][0] == 0 else 1
    refused = results[1 - winner]
    assert_refused(subprocess.CompletedProcess([], refused[0], refused[1], refused[2]))
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir / 'studies' / 'smoke.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    recorded = (study.user_attrs["config"]["finetune_steps"], study.user_attrs["heartbeat_seconds"])
    expected = {"--finetune-steps": (5, 60), "--heartbeat-seconds": (3, 1)}[flags[0]] if winner else (3, 60)
    assert recorded == expected


def test_a_study_of_the_release_before_resumes_and_an_older_ones_does_not():
    """0.9.0 changed where weights live and how plugins are recorded, not what a trial measures: a 0.8.0 study
    (plugins recorded by path) resumes; one of 0.1.0 is refused as before."""
    from ranksearch import __version__
    from ranksearch.study.config import Config, search_fields
    from ranksearch.study.storage import setup_mismatch

    config = Config()
    recorded = {"heartbeat_seconds": config.heartbeat_seconds, "config": search_fields(config) | {"plugins": []}}
    assert setup_mismatch("s", recorded | {"ranksearch_version": "0.8.0"}, config) is None
    assert setup_mismatch("s", recorded | {"ranksearch_version": __version__}, config) is None
    assert "made by ranksearch 0.1.0" in setup_mismatch("s", recorded | {"ranksearch_version": "0.1.0"}, config)


@pytest.mark.parametrize("url", ["sqlite:///file:mem1?mode=memory&uri=true", "sqlite:///studies/st5.db?mode=ro"])
def test_sensitivity_refuses_a_sqlite_url_that_is_not_a_plain_file_before_any_work(url, tmp_path, tiny_imagefolder):
    """``sensitivity`` refused these URLs only once it opened the storage, after pretraining the baseline."""
    result = run_cli("sensitivity", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--storage",
                     url, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # no baseline, no study, no --out folder
