"""The Optuna study: find it without creating anything, check a resume against it, then create or join it.

A run creates its study only once it has data and a baseline, so a failed start-up writes nothing; a study
with no trials yet may be re-configured.
"""

import contextlib
import copy
import inspect
import random
import sqlite3
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc

from . import __version__
from .attrs import FAIL_REASON, HEARTBEAT_FAILED, RETRY_OF
from .config import Config, search_fields
from .errors import UserError, first_line
from .files import check_writable
from .objectives import directions, metric_names
from .plugins import load_plugins

SQLITE_PREFIX = "sqlite:///"


def study_directions(config: Config) -> list[str]:
    """A budget study maximises val accuracy alone (its costs are trial attrs); otherwise the objectives'."""
    return ["maximize"] if config.budget is not None else directions(config.objectives)


def study_metric_names(config: Config) -> list[str]:
    return ["val_accuracy"] if config.budget is not None else metric_names(config.objectives)


def sqlite_path(storage_url: str) -> Path | None:
    """The database file of a SQLite URL, None for other storages."""
    return Path(storage_url.removeprefix(SQLITE_PREFIX)) if storage_url.startswith(SQLITE_PREFIX) else None


OPTUNA_TABLES = {"studies", "trials", "version_info"}  # what marks a SQLite file as Optuna's
CONNECT_TIMEOUT = 30  # seconds a PostgreSQL server may take to accept a connection (a silent port hung forever)


def check_storage_url(url: str) -> None:
    """Refuse a storage that would lose or damage data: an in-memory SQLite database (every result is gone when the
    command ends), or a SQLite file that another program owns (Optuna would add its tables to it)."""
    if url.startswith("sqlite:") and (not url.startswith(SQLITE_PREFIX) or url.endswith(":memory:")):
        raise UserError(f"--storage {url!r} is an in-memory database: every result would be gone when the command "
                        "ends; pass a file, such as sqlite:///studies/NAME.db")  # fmt: skip
    path = sqlite_path(url)
    if path is not None and path.is_dir():
        raise UserError(f"--storage {url!r} names a folder; name a file in it, such as "
                        f"{SQLITE_PREFIX}{path / 'NAME.db'}")  # fmt: skip
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        raise UserError(f"--storage {url!r}: {path} is not a SQLite database ({first_line(error)}); pass an Optuna "
                        "database or a new file") from None  # fmt: skip
    if tables and not OPTUNA_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
        raise UserError(f"--storage {url!r}: {path} is another program's database (tables {shown}), not Optuna's; "
                        "pass an Optuna database or a new file")  # fmt: skip


def _engine_kwargs(url: str) -> dict:
    """SQLite: writers wait for each other (up to 120 s) instead of failing with ``database is locked``;
    PostgreSQL: a connection the server dropped (restart, idle timeout) is replaced, not used."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return {}


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
                    f"cannot open storage {url!r}: the PostgreSQL driver (psycopg) is not installed; "
                    "pip install 'ranksearch[postgres]' and use a postgresql+psycopg:// URL"
                ) from None
            timeout = f" within {CONNECT_TIMEOUT} s" if "timeout" in str(error).lower() else ""
            raise UserError(
                f"cannot open storage {url!r}{timeout} ({first_line(error)}); pass an Optuna storage URL such as "
                "sqlite:///studies/NAME.db to --storage"
            ) from None
    raise AssertionError("unreachable")


def _study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    """A study that must already exist (for export, report, dashboard); a clear error otherwise."""
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"no study database {path}; check --study-name / --storage")
    check_storage_url(storage_url)
    storage = open_storage(storage_url)
    names = _study_names(storage)
    if study_name not in names:
        known = ", ".join(names) if names else "none"
        raise UserError(f"no study {study_name!r} in {storage_url} (studies there: {known}); check --study-name")
    study = optuna.load_study(study_name=study_name, storage=storage)
    load_plugins(study.user_attrs.get("config", {}).get("plugins", []))  # its costs, model or decomposition
    return study


def _check_sqlite_folder(config: Config, path: Path) -> None:
    """The database's folder must be writable (SQLite writes a journal beside the file); only the default
    ``studies/`` is created for the user."""
    if config.storage is not None and not path.parent.is_dir():
        raise UserError(
            f"cannot open storage {config.storage!r} (folder {path.parent} does not exist); create it or pass "
            "another --storage"
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

    A study without trials may be re-configured: nothing in it was measured yet.
    """
    made, wanted = [d.name.lower() for d in study.directions], study_directions(config)
    if made != wanted:
        what = f"budget {config.budget}" if config.budget else f"objectives {','.join(config.objectives)}"
        raise UserError(
            f"study {study.study_name!r} exists with directions ({', '.join(made)}), not the ({', '.join(wanted)}) of "
            f"{what}; use another --study-name"
        )
    beat = study.user_attrs.get("heartbeat_seconds")
    if beat is not None and beat != config.heartbeat_seconds:
        raise UserError(
            f"study {study.study_name!r} runs with --heartbeat-seconds {beat}; a run with {config.heartbeat_seconds} "
            f"would judge its other runs' live trials by another clock (and fail them as dead); pass "
            f"--heartbeat-seconds {beat}"
        )
    if not study.trials:
        return
    made_by = study.user_attrs.get("ranksearch_version", "unknown")
    if made_by != __version__:
        raise UserError(
            f"study {study.study_name!r} was made by ranksearch {made_by}, whose trials this version "
            f"({__version__}) would not measure alike; use another --study-name (report and export still read it)"
        )
    stored, wanted = study.user_attrs.get("config", {}), search_fields(config)
    if stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
        raise UserError(
            f"study {config.study_name!r} was made with another config ({details}); "
            "use another --study-name or the study's config"
        )


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
