"""The Optuna study: find it without creating anything, check a resume against it, then create or join it.

A run creates its study only once it has data and a baseline, so a failed start-up writes nothing; a study
with no trials yet may be re-configured.
"""

import contextlib
import copy
import inspect
import json
import logging
import os
import random
import socket
import sqlite3
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
import sqlalchemy.exc

from .. import __version__
from ..models import RANK_STEPS
from ..models.user_weights import digest_text
from ..objectives.budget import canonical_budget
from ..objectives.registry import directions, metric_names
from ..utils.errors import UserError, causes, first_line, shown_url, without_secrets
from ..utils.files import check_writable, process_alive
from ..utils.plugins import entries_text, load_recorded, pass_hint, recorded_plugins, unmatched
from .attrs import FAIL_REASON, HEARTBEAT_FAILED, RETRY_OF
from .config import Config, check_study_name, search_fields, unregistered

SQLITE_PREFIX = "sqlite:///"


def study_directions(config: Config) -> list[str]:
    """A budget study maximises val accuracy alone (its costs are trial attrs); otherwise the objectives'."""
    return ["maximize"] if config.budget is not None else directions(config.objectives)


def study_metric_names(config: Config) -> list[str]:
    return ["val_accuracy"] if config.budget is not None else metric_names(config.objectives)


def sqlite_path(storage_url: str) -> Path | None:
    """The database file of a SQLite URL, None for other storages."""
    return Path(storage_url.removeprefix(SQLITE_PREFIX)) if storage_url.startswith(SQLITE_PREFIX) else None


def weights_folder(storage_url: str, study_name: str, server_folder: str | None = None,
                   given_as: str = "weights_dir") -> Path:  # fmt: skip
    """Where the kept weights of study ``study_name`` live, derived from the storage's own location and never from a
    path stored in the database (a copied or foreign database must not reach another study's files): beside a
    SQLite database, ``<its folder>/<study_name>-weights``; for a server storage (PostgreSQL), which has no folder,
    ``server_folder`` (the config's ``weights_dir``, ``--weights-dir``: ``given_as`` names it in errors), default
    ``studies/<study_name>-weights`` in the working folder. UserError for a study name that is no name (it would
    reach outside the folder), and for a ``server_folder`` with SQLite or an empty one."""
    check_study_name(study_name)
    path = sqlite_path(storage_url)
    beside = None if path is None else path.parent / f"{study_name}-weights"
    if server_folder is not None and beside is not None:
        raise UserError(f"{given_as} {server_folder!r}: a SQLite study keeps its weights beside its database "
                        f"({beside}); {given_as} is for server storages (PostgreSQL)")  # fmt: skip
    if server_folder is not None and not server_folder.strip():
        raise UserError(f"{given_as} is empty; name a folder, or drop it for studies/{study_name}-weights")
    return beside or Path(server_folder or f"studies/{study_name}-weights")


OPTUNA_TABLES = {"studies", "trials", "version_info"}  # what marks a SQLite file as Optuna's
CONNECT_TIMEOUT = 30  # seconds a PostgreSQL server may take to accept a connection (a silent port hung forever)
# seconds a PostgreSQL statement may wait for a lock another session holds (LOCK TABLE trials hung a run silently);
# only the wait counts, never the statement's own work, and Optuna holds its locks for milliseconds
LOCK_TIMEOUT = 30


def check_sqlite_form(url: str) -> None:
    """Refuse a SQLite URL whose database is not the plain file it names: an in-memory one (``sqlite://``,
    ``:memory:``, ``mode=memory``: every result is gone when the command ends), or one with query parameters or a
    ``file:`` URI (SQLAlchemy may turn them into another file, such as one named ``NAME.db?mode=ro``, or a shared
    in-memory database), so that no check reads one file while the run writes another."""
    if not url.startswith("sqlite:"):
        return
    rest = url.removeprefix(SQLITE_PREFIX)
    if not url.startswith(SQLITE_PREFIX) or ":memory:" in rest or "mode=memory" in rest:
        raise UserError(f"--storage {url!r} is an in-memory database: every result would be gone when the command "
                        "ends; pass a file, such as sqlite:///studies/NAME.db")  # fmt: skip
    if "?" in rest or rest.startswith("file:"):
        raise UserError(f"--storage {url!r}: a SQLite URL with query parameters or a file: URI is not supported (it "
                        "may open another database than the file it names); pass a plain file, such as "
                        "sqlite:///studies/NAME.db")  # fmt: skip


def check_storage_url(url: str) -> None:
    """Refuse a storage that would lose or damage data: an in-memory SQLite database (every result is gone when the
    command ends), or a SQLite file that another program owns (Optuna would add its tables to it)."""
    shown = shown_url(url)
    check_sqlite_form(url)
    path = sqlite_path(url)
    if path is not None and path.is_dir():
        raise UserError(f"--storage {shown!r} names a folder; name a file in it, such as "
                        f"{SQLITE_PREFIX}{path / 'NAME.db'}")  # fmt: skip
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        raise UserError(f"--storage {shown!r}: {path} is not a SQLite database ({first_line(error)}); pass an Optuna "
                        "database or a new file") from None  # fmt: skip
    if tables and not OPTUNA_TABLES <= tables:
        names = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
        raise UserError(f"--storage {shown!r}: {path} is another program's database (tables {names}), not Optuna's; "
                        "pass an Optuna database or a new file")  # fmt: skip


def _engine_kwargs(url: str) -> dict:
    """SQLite: writers wait for each other (up to 120 s) instead of failing with ``database is locked``;
    PostgreSQL: a connection the server dropped (restart, idle timeout) is replaced, not used, and a statement
    waits at most ``LOCK_TIMEOUT`` for a lock (the URL's own ``options`` are kept)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}
    if url.startswith("postgresql"):
        options = f"{_url_options(url)} -c lock_timeout={LOCK_TIMEOUT * 1000}".strip()  # milliseconds
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT, "options": options}}
    return {}


def _url_options(url: str) -> str:
    """The ``options`` query parameter of a PostgreSQL URL ('' when none, or when SQLAlchemy cannot parse it:
    opening it then fails on its own)."""
    try:
        value = sqlalchemy.engine.make_url(url).query.get("options", "")
    except Exception:
        return ""
    return " ".join(value) if isinstance(value, tuple) else value


def storage_failure(error: BaseException) -> str | None:
    """What the storage itself said behind ``error``, in one line; None when no storage failed. Optuna hides it:
    a failed tell becomes ``AssertionError: Should not reach.``, and any database error in a commit (a killed
    server, a lock timeout) becomes StorageInternalError's "invalid data in the commit, e.g. exceeding max
    length"; the driver's own error is behind them, the first one raised (a lock timeout, say, before the
    "current transaction is aborted" of the statements after it)."""
    found = None
    for cause in causes(error):
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.orig is not None:
            found = cause.orig
        elif found is None and isinstance(cause, (sqlalchemy.exc.SQLAlchemyError,
                                                  optuna.exceptions.StorageInternalError)):  # fmt: skip
            found = cause
    return None if found is None else _with_lock_hint(first_line(found))


class _QuietFallback(logging.Filter):
    """Drops Optuna's "Caught an error from sqlalchemy: ... Falling back to a slower alternative" (many lines, the
    SQL included), logged for any error of a trials query, a lock timeout too: the error of the query it falls
    back to is what the command reports, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Caught an error from sqlalchemy")


logging.getLogger("optuna.storages._rdb.storage").addFilter(_QuietFallback())


def _with_lock_hint(text: str) -> str:
    if "lock timeout" not in text:
        return text
    return f"{text}: another session held a lock on the study's tables for over {LOCK_TIMEOUT} s"


def _retry_callback() -> tuple[type, str]:
    """Optuna's callback that enqueues a stale trial again, and the RDBStorage argument that takes it (Optuna 4.9
    renamed both; both spellings are accepted)."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    name = "heartbeat_stale_trial_callback"
    if retry is None or name not in inspect.signature(optuna.storages.RDBStorage).parameters:
        retry, name = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
    return retry, name


def stale_reason(grace_seconds: int) -> str:
    """The ``fail_reason`` of a trial the heartbeat failed (``attrs.HEARTBEAT_FAILED`` starts it)."""
    return f"{HEARTBEAT_FAILED} its worker was silent for over {grace_seconds} s (killed, or hung)"


class HeartbeatStorage(optuna.storages.RDBStorage):
    """RDBStorage with the heartbeat: a trial whose worker is silent for 2x ``seconds`` is failed, with its
    ``fail_reason`` (``stale_reason``), and retried (3 times at most, with the same parameters) by a trial whose
    ``retry_of`` names it.

    Optuna fails the trial first and then calls back, and a finished trial takes no attrs: the callback's one write
    of ``fail_reason`` to the trial this process has just failed is let through (``check_trial_is_updatable``).
    """

    def __init__(self, url: str, engine_kwargs: dict, seconds: int):
        retry, name = _retry_callback()
        self.retry, self.grace_seconds = retry(max_retry=3), 2 * seconds
        self.recording: int | None = None  # the trial whose fail_reason the callback is writing
        super().__init__(url, engine_kwargs=engine_kwargs, heartbeat_interval=seconds,
                         grace_period=self.grace_seconds, **{name: self.failed_stale})  # fmt: skip

    def failed_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's callback for a trial this process failed by the heartbeat."""
        self.recording = trial._trial_id
        try:
            self.set_trial_user_attr(trial._trial_id, FAIL_REASON, stale_reason(self.grace_seconds))
        finally:
            self.recording = None
        again = copy.deepcopy(trial)
        again.user_attrs = {RETRY_OF: trial.number}  # not the dead trial's half-measured attrs, nor its reason
        self.retry(study, again)

    def check_trial_is_updatable(self, trial_id: int, trial_state: optuna.trial.TrialState) -> None:
        if trial_id != self.recording:
            super().check_trial_is_updatable(trial_id, trial_state)


# What the database says when another process creates the same tables at the same instant.
_RACE_MESSAGES = ("already exists", "duplicate", "database is locked", "concurrently", "deadlock detected")


def _is_creation_race(error: Exception) -> bool:
    """An error another process creating the same tables at the same instant can cause: PostgreSQL's
    ``UniqueViolation ... pg_type_typname_nsp_index`` or ``DuplicateTable``, SQLite's ``database is locked`` or
    ``table ... already exists`` (Optuna wraps some in StorageInternalError). A refused connection, a wrong password
    or a missing privilege is not one: it is reported at once."""
    if isinstance(error, optuna.exceptions.StorageInternalError) and isinstance(error.__cause__, Exception):
        error = error.__cause__
    if isinstance(error, sqlalchemy.exc.IntegrityError):
        return True
    return isinstance(error, sqlalchemy.exc.DBAPIError) and any(text in str(error) for text in _RACE_MESSAGES)


def _missing_driver(url: str, error: Exception) -> bool:
    return url.startswith("postgresql") and isinstance(error, ImportError)


CREATE_ATTEMPTS = 8  # storage creation tries when other processes create the same tables at the same instant


def open_storage(url: str, heartbeat_seconds: int | None = None) -> optuna.storages.BaseStorage:
    """The storage at ``url`` (a new SQLite file, or the tables of an empty database, are created); a one-line
    UserError when it cannot be opened.

    With ``heartbeat_seconds`` (``run``), running trials send a heartbeat and a dead worker's trial is failed and
    retried; without it (read-only commands), a plain storage. Any number of processes may open the same fresh
    storage at once: creating the tables is retried after a short random sleep when they race.
    """
    check_sqlite_form(url)
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # the heartbeat and its retry callback are "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeat_seconds is not None:
                    return HeartbeatStorage(url, _engine_kwargs(url), heartbeat_seconds)
                return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        except Exception as error:
            if _is_creation_race(error) and attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # jittered: the racers spread out
                continue
            if _missing_driver(url, error):
                raise UserError(
                    f"cannot open storage {shown_url(url)!r}: the PostgreSQL driver (psycopg) is not installed; "
                    "pip install 'ranksearch[postgres]' and use a postgresql+psycopg:// URL"
                ) from None
            timeout = f" within {CONNECT_TIMEOUT} s" if "timeout" in str(error).lower() else ""
            why = without_secrets(first_line(error), url)
            raise UserError(
                f"cannot open storage {shown_url(url)!r}{timeout} ({why}); pass an Optuna storage URL such as "
                "sqlite:///studies/NAME.db to --storage"
            ) from None
    raise AssertionError("unreachable")


def _study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


_NOT_FOUND = "Record does not exist."  # Optuna's KeyError for a study or trial the storage no longer holds


def _missing_record(error: BaseException) -> bool:
    """Whether Optuna's KeyError for a missing study or trial record is ``error`` or in its chain."""
    return any(isinstance(cause, KeyError) and _NOT_FOUND in str(cause) for cause in causes(error))


@contextlib.contextmanager
def deleted_study_is_one_line(storage_url: str, study_name: str):
    """A study deleted while this process works on it (optuna-dashboard's delete, ``optuna.delete_study``) ends the
    body with one UserError instead of Optuna's chained KeyErrors (from a trial's attrs, its tell or a callback)."""
    try:
        yield
    except Exception as error:
        if not _missing_record(error):
            raise
        try:
            gone = study_name not in _study_names(open_storage(storage_url))
        except UserError:
            gone = False
        if not gone:
            raise
        raise UserError(f"study {study_name!r} was deleted while this run worked on it (from optuna-dashboard or "
                        "another program), with its trials; run again to start it anew") from None  # fmt: skip


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    """A study that must already exist (for export, report, dashboard); a clear error otherwise."""
    check_sqlite_form(storage_url)
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"no study database {path}; check --study-name / --storage")
    check_storage_url(storage_url)
    storage = open_storage(storage_url)
    names = _study_names(storage)
    if study_name not in names:
        known = ", ".join(names) if names else "none"
        raise UserError(
            f"no study {study_name!r} in {shown_url(storage_url)} (studies there: {known}); check --study-name"
        )
    return optuna.load_study(study_name=study_name, storage=storage)  # its plugins not imported: load_study_plugins


def load_study_plugins(study: optuna.Study, passed: Sequence[str], uses: tuple[str, ...]) -> None:
    """Import the plugins passed on this command (``--plugin``), each checked against the study's record by
    content; then a one-line UserError, naming the study's plugins and how to pass them, when what the command
    ``uses`` of the study (``config.unregistered``: its model, decomposition, costs) is still unregistered. A
    study's plugins are never imported from its record."""
    fields = study.user_attrs.get("config", {})
    load_recorded(f"study {study.study_name!r}", fields.get("plugins"), passed, lambda: unregistered(fields, uses))


def _check_sqlite_folder(config: Config, path: Path) -> None:
    """The database's folder must be writable (SQLite writes a journal beside the file); only the default
    ``studies/`` is created for the user."""
    if config.storage is not None and not path.parent.is_dir():
        raise UserError(
            f"cannot open storage {shown_url(config.storage)!r} (folder {path.parent} does not exist); create it or "
            "pass another --storage"
        )
    check_writable(path.parent, "study folder")


def find_study(config: Config) -> optuna.Study | None:
    """The existing study ``config`` resumes, checked against it; None when there is none. Creates no study (an
    existing SQLite file or an empty database gets Optuna's tables). Opened with the heartbeat: a run adds trials
    to it."""
    url = config.storage_url()
    check_storage_url(url)
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_folder(config, path)
        if not path.is_file():
            return None
    storage = open_storage(url, config.heartbeat_seconds)
    if config.study_name not in _study_names(storage):
        return None
    study = optuna.load_study(study_name=config.study_name, storage=storage)
    check_compatible(study, config)
    return study


def check_compatible(study: optuna.Study, config: Config) -> None:
    """Refuse to add trials to a study made with other directions, another ranksearch or another config.

    A study without trials may be re-configured: nothing in it was measured yet (``claim_study`` decides whether
    another run is about to measure it).
    """
    made, wanted = [d.name.lower() for d in study.directions], study_directions(config)
    if made != wanted:
        what = f"budget {config.budget}" if config.budget else f"objectives {','.join(config.objectives)}"
        raise UserError(
            f"study {study.study_name!r} exists with directions ({', '.join(made)}), not the ({', '.join(wanted)}) of "
            f"{what}; use another --study-name"
        )
    problem = setup_mismatch(study.study_name, study.user_attrs, config, measured=bool(study.trials))
    if problem is not None:
        raise UserError(problem)


# Earlier versions whose trials this one measures alike, so that their studies resume: 0.9.0 changed where weights
# live, how plugins are recorded and what a failure records, not what a trial measures; 0.10.0 trains budget mode's
# trials in rungs, so their budget studies do not resume (their multi-objective ones do).
# 0.11.0 adds the user's weights, a set normalization and streamed data (the same batches): no earlier trial changes.
# 0.12.0 draws an epoch's crops and flips at once (the same values) and GP's suggestions faster: none changes either.
# 0.13.0 records a trial's conv_ranks and kept_convs as system attrs, not user attrs (both are read).
MEASURES_ALIKE = ("0.8.0", "0.9.0", "0.10.0", "0.11.0", "0.12.0")
BUDGET_MEASURES_ALIKE = ("0.10.0", "0.11.0", "0.12.0")  # budget studies: since rungs


def setup_mismatch(study_name: str, recorded: dict, config: Config, measured: bool = True) -> str | None:
    """Why ``config`` may not add trials to a study whose setup is ``recorded`` (its user attrs, or a claim:
    ``heartbeat_seconds``, ``ranksearch_version``, ``config``), or None. The heartbeat always counts; the version
    and the config only when ``measured`` (the study has trials, or a live run claimed it)."""
    beat = recorded.get("heartbeat_seconds")
    if beat is not None and beat != config.heartbeat_seconds:
        return (f"study {study_name!r} runs with --heartbeat-seconds {beat}; a run with {config.heartbeat_seconds} "
                f"would judge its other runs' live trials by another clock (and fail them as dead); pass "
                f"--heartbeat-seconds {beat}")  # fmt: skip
    if not measured:
        return None
    made_by = recorded.get("ranksearch_version", "unknown")
    alike = MEASURES_ALIKE if config.budget is None else BUDGET_MEASURES_ALIKE
    if made_by != __version__ and made_by not in alike:
        return (f"study {study_name!r} was made by ranksearch {made_by}, whose trials this version "
                f"({__version__}) would not measure alike; use another --study-name (report and export still read "
                "it)")  # fmt: skip
    stored, wanted = recorded_config(recorded.get("config", {})), search_fields(config)
    weights = other_weights(study_name, stored.get("weights"), wanted.get("weights"), recorded.get("weights_file"))
    if weights is not None:
        return weights
    _check_plugins(study_name, recorded_plugins(stored.get("plugins")), config.plugins)
    stored, wanted = ({k: v for k, v in fields.items() if k != "plugins"} for fields in (stored, wanted))
    if stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
        return (f"study {study_name!r} was made with another config ({details}); "
                "use another --study-name or the study's config")  # fmt: skip
    return None


def other_weights(study_name: str, recorded: dict | None, given: dict | None, file: str | None) -> str | None:
    """Why weights ``given`` (a ``weights_record``, or None: pretrained) may not add trials to a study made from
    ``recorded`` (read from ``file``), or None: the same file's content, or both pretrained."""
    if (recorded or {}).get("sha256") == (given or {}).get("sha256"):
        return None
    file = file or "its weights file"  # a claim of a run that has not recorded its setup yet names none
    if recorded is None:
        return (f"study {study_name!r} was made from a baseline ranksearch pretrained, not from --weights; drop "
                "--weights or use another --study-name")  # fmt: skip
    if given is None:
        return (f"study {study_name!r} was made from --weights {file} ({digest_text(recorded)}); pass that file "
                "again or use another --study-name")  # fmt: skip
    return (f"study {study_name!r} was made from other weights ({file}, {digest_text(recorded)}; this --weights: "
            f"{digest_text(given)}); pass the file it was made from or use another --study-name")  # fmt: skip


def _check_plugins(study_name: str, recorded: list, passed: list[str]) -> None:
    """A resumed study's trials measure with its plugins: each recorded one must be passed again (by content: a
    moved file is the same plugin, a changed one is refused), and no other."""
    left = unmatched(f"study {study_name!r}", recorded, passed)
    if left:
        raise UserError(f"study {study_name!r} was made with plugin(s) {entries_text(left)}: pass {pass_hint(left)} "
                        "(or use another --study-name)")  # fmt: skip


def recorded_config(fields: dict) -> dict:
    """The search fields a study records (``fields``), its budget in ``canonical_budget``'s spelling (earlier
    studies recorded the user's text: their ``macs=.3`` is the ``macs=0.3`` of a resume; they drew without a rank
    spread, ``rank_spread`` 32)."""
    stored = dict(fields)
    if fields:
        stored.setdefault("rank_spread", RANK_STEPS)  # before 0.10.0: every vector of the grid could be drawn
    if isinstance(stored.get("budget"), str):
        with contextlib.suppress(UserError):
            stored["budget"] = canonical_budget(stored["budget"])
    return stored


def check_data(study: optuna.Study | None, data_identity: dict) -> None:
    """Refuse data other than what the study's trials were measured on (``run`` resuming it, ``export``). Not
    checked: a study without trials, or made before 0.2.0 (it recorded no data)."""
    recorded = study.user_attrs.get("data") if study is not None and study.trials else None
    if recorded is None:
        return
    changed = [key for key in data_identity if recorded.get(key) != data_identity[key]]
    if changed:
        details = ", ".join(f"{k}: {recorded.get(k)} -> {data_identity[k]}" for k in changed)
        raise UserError(
            f"study {study.study_name!r} was run on other data ({details}); pass the --data-dir it used "
            f"({study.user_attrs.get('data_dir', 'not recorded')})"
        )


def check_latency_device(study: optuna.Study | None, device: dict | None) -> None:
    """Refuse to add trials measured elsewhere (``device``: another CPU, thread count, GPU or batch, as
    ``latency.latency_device`` describes it) to a study whose latencies were measured on its recorded device."""
    if study is None or device is None or not study.trials:
        return
    recorded = study.user_attrs.get("latency_device")
    if recorded is not None and recorded != device:
        changed = sorted(k for k in set(recorded) | set(device) if recorded.get(k) != device.get(k))
        details = ", ".join(f"{k}: {recorded.get(k)!r} -> {device.get(k)!r}" for k in changed)
        raise UserError(
            f"study {study.study_name!r} measured latency elsewhere ({details}); its latencies would not compare: "
            "resume it where it ran (same device, --workers and thread count) or use another --study-name"
        )


def create_or_load(config: Config) -> optuna.Study:
    """The study named by ``config``: loaded when it exists (another process may have just made it: Optuna turns
    the duplicate into a load), with the heartbeat of ``config.heartbeat_seconds``."""
    storage = open_storage(config.storage_url(), config.heartbeat_seconds)
    return optuna.create_study(
        storage=storage, study_name=config.study_name, directions=study_directions(config), load_if_exists=True
    )


def record_setup(study: optuna.Study, config: Config, **attrs) -> None:
    """What the study's trials are measured with: config, ranksearch version, metric names, and ``attrs``
    (data identity, baseline metrics, paths)."""
    study.set_metric_names(study_metric_names(config))
    study.set_user_attr("config", search_fields(config))
    study.set_user_attr("ranksearch_version", __version__)
    study.set_user_attr("heartbeat_seconds", config.heartbeat_seconds)  # every run on it must use the same
    for key, value in attrs.items():
        study.set_user_attr(key, value)


CLAIM = "setup_claim"  # the study user attr a run claims the study with: its setup and the processes on it
CLAIM_ATTEMPTS = 20  # compare-and-swap tries when other runs join or re-configure the same study at once


def _setup(config: Config) -> dict:
    """What every run adding trials to a study must share (``record_setup`` writes it as attrs too)."""
    return {"config": search_fields(config), "heartbeat_seconds": config.heartbeat_seconds,
            "ranksearch_version": __version__}  # fmt: skip


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(owner: dict) -> bool:
    """Whether a claim's process may still run: True unless it ran on this host and is gone (another host's
    processes cannot be seen from here)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True
    return process_alive(owner["pid"])


def _rdb(study: optuna.Study) -> optuna.storages.RDBStorage:
    """The RDBStorage under ``study`` (Optuna wraps it in a cache)."""
    return getattr(study._storage, "_backend", study._storage)


def _attr_table():
    from optuna.storages._rdb.models import StudyUserAttributeModel

    return StudyUserAttributeModel.__table__


def _insert_claim(engine, study_id: int, value: str) -> str | None:
    """Insert the claim row in one transaction; None when it is ours, else the claim already there. The table's
    unique (study_id, key) makes two inserts at once end as one row on SQLite and PostgreSQL alike."""
    table = _attr_table()
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.insert(table).values(study_id=study_id, key=CLAIM, value_json=value))
        return None
    except sqlalchemy.exc.IntegrityError:
        return _read_claim(engine, study_id)


def _read_claim(engine, study_id: int) -> str:
    """The study's claim as stored; "" when it has none (or it was deleted meanwhile)."""
    table = _attr_table()
    with engine.connect() as connection:
        query = sqlalchemy.select(table.c.value_json).where(table.c.study_id == study_id, table.c.key == CLAIM)
        row = connection.execute(query).first()
    return row[0] if row is not None else ""


def _swap_claim(engine, study_id: int, old: str, new: str) -> bool:
    """Replace the claim ``old`` by ``new`` if nobody changed it since it was read (compare-and-swap)."""
    table = _attr_table()
    with engine.begin() as connection:
        changed = connection.execute(
            sqlalchemy.update(table)
            .where(table.c.study_id == study_id, table.c.key == CLAIM, table.c.value_json == old)
            .values(value_json=new)
        )
    return changed.rowcount == 1


def claim_study(study: optuna.Study, config: Config) -> None:
    """Claim ``study`` for ``config``'s setup (config, heartbeat, version) before any trial is asked for, atomically:
    of runs started at the same instant with other setups, exactly one claims it and the others get a one-line
    UserError, before they could fail a live trial (Optuna fails stale trials only when a trial is asked for).

    A run with the claimed setup joins it (and, while there are no trials, adds itself to the claim's processes).
    A claim with no trials whose processes are all gone (a run that stopped before its first trial) may be
    re-configured; one with trials, or with a process that may still run, may not.
    """
    engine = _rdb(study).engine
    study_id = _rdb(study).get_study_id_from_name(study.study_name)
    mine = _setup(config)
    for _ in range(CLAIM_ATTEMPTS):
        claimed_text = _insert_claim(engine, study_id, json.dumps(mine | {"processes": [_this_process()]}))
        if claimed_text is None:
            return
        if not claimed_text:  # gone meanwhile: try again
            continue
        claimed = json.loads(claimed_text)
        processes = claimed.get("processes", [])
        measured = bool(study.get_trials(deepcopy=False))
        problem = setup_mismatch(study.study_name, claimed, config)
        if problem is None:
            if measured:
                return
            joined = claimed | {"processes": [*processes, _this_process()]}
        elif measured or any(_alive(p) for p in processes):
            raise UserError(problem)
        else:
            joined = mine | {"processes": [_this_process()]}  # the run that claimed it ended before any trial
        if _swap_claim(engine, study_id, claimed_text, json.dumps(joined)):
            return
    raise UserError(f"study {study.study_name!r}: other runs kept changing its claim; run again")


def release_claim(study: optuna.Study) -> None:
    """This process leaves the study's claim (a run ends): a claim with no trials and no process left may be
    re-configured. Best effort: a storage that fails here leaves the entry of a process that is about to end, which
    ``claim_study`` tells is gone on this host."""
    me = _this_process()
    try:
        engine = _rdb(study).engine
        study_id = _rdb(study).get_study_id_from_name(study.study_name)
        for _ in range(CLAIM_ATTEMPTS):
            claimed_text = _read_claim(engine, study_id)
            if not claimed_text:
                return
            claimed = json.loads(claimed_text)
            processes = claimed.get("processes", [])
            left = [p for p in processes if p != me]
            if left == processes or _swap_claim(
                engine, study_id, claimed_text, json.dumps(claimed | {"processes": left})
            ):
                return
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, KeyError):
        return
