"""optuna-dashboard for a ranksearch study, served from Python (no separate ``optuna-dashboard`` command needed)."""

import sys
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import BinaryIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle
import optuna
import optuna_dashboard
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from .errors import UserError, first_line
from .study import load_existing_study, sqlite_path
from .study import open_storage as _storage

WEIGHTS_DIR_ATTR = "weights_dir"  # study user attr: the folder of its FileSystemArtifactStore


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    """Serves requests in threads (the dashboard polls while a page loads); threads end with the server."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No log line per request: the dashboard polls every few seconds."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass


def open_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """The storage at ``storage_url``; a missing SQLite file is an error rather than a new empty database."""
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"no study database {path}; check --study-name / --storage")
    return _storage(storage_url)


class WeightsStores:
    """Optuna's ArtifactStore over the kept weights of every study in a storage, one folder each (artifact ids
    are UUIDs, so they never clash); an artifact uploaded in the dashboard goes to the first folder."""

    def __init__(self, folders: list[str]):
        self.stores = [FileSystemArtifactStore(folder) for folder in folders]

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                pass
        # the dashboard would answer 500; the study still lists the weights of trials that left the Pareto front
        raise bottle.HTTPError(404, f"no artifact {artifact_id}: a trial's weights are deleted once it is dominated")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        """Remove the artifact wherever it is; one already gone (a pruned trial's weights, whose record Optuna
        keeps) is nothing to do, so that deleting a study never stops half-way."""
        for store in self.stores:
            try:
                return store.remove(artifact_id)
            except ArtifactNotFound:
                pass


def weights_stores(storage: optuna.storages.BaseStorage) -> WeightsStores | None:
    """The kept weights of the storage's studies (their ``weights_dir`` attrs); None when no folder exists."""
    folders = {study.user_attrs.get(WEIGHTS_DIR_ATTR) for study in storage.get_all_studies()}
    existing = sorted(folder for folder in folders if isinstance(folder, str) and Path(folder).is_dir())
    return WeightsStores(existing) if existing else None


def make_app(storage_url: str) -> Callable:
    """The optuna-dashboard WSGI app (a bottle app) for every study in ``storage_url``, with their kept weights as
    downloadable artifacts; UserError if the storage cannot be opened."""
    storage = open_storage(storage_url)
    return optuna_dashboard.wsgi(storage, artifact_store=weights_stores(storage))


def study_path(storage_url: str, study_name: str) -> str:
    """The dashboard's page of ``study_name`` (``/dashboard/studies/<id>``); UserError if there is no such study."""
    load_existing_study(storage_url, study_name)
    return f"/dashboard/studies/{open_storage(storage_url).get_study_id_from_name(study_name)}"


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_host(host: str) -> str:
    """``host`` to listen on: an empty one (every address, said by nothing) is refused; a non-loopback one is served
    with a warning, since the dashboard has no login and can delete studies."""
    if not host.strip():
        raise UserError("--host is empty, which would listen on every address of this machine; pass 127.0.0.1 "
                        "(the default), or 0.0.0.0 to serve the network on purpose")  # fmt: skip
    if host not in LOOPBACK:
        print(f"warning: serving on {host}: anyone who can reach this machine can read and delete the studies "
              "(the dashboard has no login); --host 127.0.0.1 keeps it to this machine", file=sys.stderr)  # fmt: skip
    return host


def make_dashboard_server(storage_url: str, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A bound, not yet serving, server of the dashboard (port 0: any free port); UserError if it cannot bind or
    ``host`` is empty (``check_host``)."""
    check_host(host)
    app = make_app(storage_url)
    try:
        return make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except (OSError, OverflowError) as error:  # OverflowError: a port outside 0..65535
        raise UserError(f"cannot serve on {host}:{port} ({first_line(error)}); pass another --port / --host") from None


def server_url(server: WSGIServer, path: str = "/dashboard") -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{path}"


def serve(storage_url: str, host: str = "127.0.0.1", port: int = 8080, study_name: str | None = None) -> None:
    """Serve the dashboard until Ctrl-C (blocking, then returns); prints its URL first (the study's page if
    ``study_name``). UserError for a bad storage, an unknown study or a port that cannot be bound."""
    path = study_path(storage_url, study_name) if study_name else "/dashboard"
    server = make_dashboard_server(storage_url, host, port)
    print(f"optuna-dashboard on {server_url(server, path)} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        server.server_close()
