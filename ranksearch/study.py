"""The Optuna study: find it without creating anything, check a resume against it, then create or join it.

A run creates its study only once it has data and a baseline, so a failed start-up writes nothing; a study
with no trials yet may be re-configured.
"""

from pathlib import Path

import optuna

from . import __version__
from .config import Config, search_fields
from .errors import UserError
from .files import check_writable

DIRECTIONS = ["maximize", "minimize"]  # (validation accuracy, MACs)
METRIC_NAMES = ["val_accuracy", "macs"]  # what optuna-dashboard labels the objectives
_DIRECTIONS = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
SQLITE_PREFIX = "sqlite:///"


def sqlite_path(storage_url: str) -> Path | None:
    """The database file of a SQLite URL, None for other storages."""
    return Path(storage_url.removeprefix(SQLITE_PREFIX)) if storage_url.startswith(SQLITE_PREFIX) else None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url`` (a new SQLite file is created); a one-line UserError when it cannot be opened."""
    try:
        return optuna.storages.get_storage(url)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot open storage {url!r} ({first_line}); pass an Optuna storage URL such as "
            "sqlite:///studies/NAME.db to --storage"
        ) from None


def _study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    """A study that must already exist (for export, report, dashboard); a clear error otherwise."""
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"no study database {path}; check --study-name / --storage")
    storage = open_storage(storage_url)
    names = _study_names(storage)
    if study_name not in names:
        known = ", ".join(names) if names else "none"
        raise UserError(f"no study {study_name!r} in {storage_url} (studies there: {known}); check --study-name")
    return optuna.load_study(study_name=study_name, storage=storage)


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
    """The existing study ``config`` resumes, checked against it; None when there is none. Creates nothing."""
    url = config.storage_url()
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_folder(config, path)
        if not path.is_file():
            return None
    storage = open_storage(url)
    if config.study_name not in _study_names(storage):
        return None
    study = optuna.load_study(study_name=config.study_name, storage=storage)
    check_compatible(study, config)
    return study


def check_compatible(study: optuna.Study, config: Config) -> None:
    """Refuse to add trials to a study made with other directions, another ranksearch or another config.

    A study without trials may be re-configured: nothing in it was measured yet.
    """
    if study.directions != _DIRECTIONS:
        raise UserError(
            f"study {study.study_name!r} exists with directions "
            f"{[d.name.lower() for d in study.directions]}, not {DIRECTIONS}; use another --study-name"
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
    """Refuse to resume a study (with trials) on data other than the data its trials were measured on."""
    if study is None or not study.trials:
        return
    recorded = study.user_attrs.get("data", {})
    changed = [key for key in data_identity if recorded.get(key) != data_identity[key]]
    if changed:
        details = ", ".join(f"{k}: {recorded.get(k)} -> {data_identity[k]}" for k in changed)
        raise UserError(
            f"study {study.study_name!r} was run on other data ({details}); pass the --data-dir it used "
            f"({study.user_attrs.get('data_dir', 'not recorded')}) or use another --study-name"
        )


def create_or_load(config: Config) -> optuna.Study:
    """The study named by ``config``: loaded when it exists (another process may have just made it)."""
    storage = open_storage(config.storage_url())
    return optuna.create_study(
        storage=storage, study_name=config.study_name, directions=DIRECTIONS, load_if_exists=True
    )


def record_setup(study: optuna.Study, config: Config, **attrs) -> None:
    """What the study's trials are measured with: config, ranksearch version, metric names, and ``attrs``
    (data identity, baseline metrics, paths)."""
    study.set_metric_names(METRIC_NAMES)
    study.set_user_attr("config", search_fields(config))
    study.set_user_attr("ranksearch_version", __version__)
    for key, value in attrs.items():
        study.set_user_attr(key, value)
