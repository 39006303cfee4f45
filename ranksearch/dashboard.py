"""optuna-dashboard for a ranksearch study, served from Python (no separate ``optuna-dashboard`` command needed)."""

from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard

from .errors import UserError
from .search import _storage, load_existing_study

SQLITE_PREFIX = "sqlite:///"


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    """Serves requests in threads (the dashboard polls while a page loads); threads end with the server."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No log line per request: the dashboard polls every few seconds."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass


def open_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """The storage at ``storage_url``; a missing SQLite file is an error rather than a new empty database."""
    if storage_url.startswith(SQLITE_PREFIX) and not Path(storage_url.removeprefix(SQLITE_PREFIX)).is_file():
        raise UserError(f"no study database {storage_url.removeprefix(SQLITE_PREFIX)}; check --study-name / --storage")
    return _storage(storage_url)


def make_app(storage_url: str) -> Callable:
    """The optuna-dashboard WSGI app (a bottle app) for every study in ``storage_url``; UserError if it cannot be
    opened."""
    return optuna_dashboard.wsgi(open_storage(storage_url))


def study_path(storage_url: str, study_name: str) -> str:
    """The dashboard's page of ``study_name`` (``/dashboard/studies/<id>``); UserError if there is no such study."""
    load_existing_study(storage_url, study_name)
    return f"/dashboard/studies/{open_storage(storage_url).get_study_id_from_name(study_name)}"


def make_dashboard_server(storage_url: str, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A bound, not yet serving, server of the dashboard (port 0: any free port); UserError if it cannot bind."""
    app = make_app(storage_url)
    try:
        return make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as error:
        raise UserError(
            f"cannot serve on {host}:{port} ({error.strerror or error}); pass another --port / --host"
        ) from None


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
