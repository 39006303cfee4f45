"""optuna-dashboard for a ranksearch study, served from Python (no separate ``optuna-dashboard`` command needed)."""

import ipaddress
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import BinaryIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle
import optuna
import optuna_dashboard

from ..study.storage import load_existing_study, sqlite_path, weights_folder
from ..study.storage import open_storage as _storage
from ..study.weights import is_weights_id
from ..utils.errors import UserError, first_line


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    """Serves requests in threads (the dashboard polls while a page loads); threads end with the server."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No log line per request: the dashboard polls every few seconds."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass


PARETO_PLOT_ID = "ranksearch-pareto"  # the study's own plot in optuna-dashboard (one per study, replaced each run)


def save_pareto_plot(study: optuna.Study) -> None:
    """The report's Pareto figure (val % against each cost's ratio to the baseline's, log, the front, the baseline,
    a budget's line) saved into the study, where optuna-dashboard shows it on the study's page beside its own plot
    (which draws val as a fraction against absolute costs). Nothing without a complete trial."""
    from .report import pareto_figure

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return
    optuna_dashboard.save_plotly_graph_object(study, pareto_figure(study), graph_object_id=PARETO_PLOT_ID)


def open_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """The storage at ``storage_url``; a missing SQLite file is an error rather than a new empty database."""
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        raise UserError(f"no study database {path}; check --study-name / --storage")
    return _storage(storage_url)


class WeightsStores:
    """Optuna's ArtifactStore over the kept weights of every study in a storage, each in the folder derived from the
    storage (``storage.weights_folder``; artifact ids are UUIDs, so they never clash); an artifact uploaded in the
    dashboard goes to the first folder. Only files of the form this store writes are read or removed: a UUID name
    (``weights.is_weights_id``), a regular file inside one of these folders; an id from the study's records with a
    path in it reads as missing, and removing it removes nothing."""

    def __init__(self, folders: list[Path]):
        self.folders = folders

    def _file(self, artifact_id: str) -> Path | None:
        """The weights file ``artifact_id`` names in one of the folders, or None."""
        if not is_weights_id(artifact_id):
            return None
        for folder in self.folders:
            path = folder / artifact_id
            if path.is_file() and not path.is_symlink():
                return path
        return None

    def open_reader(self, artifact_id: str) -> BinaryIO:
        path = self._file(artifact_id)
        if path is None:
            # the dashboard would answer 500; the study still lists the weights of trials that left the Pareto front
            raise bottle.HTTPError(404, f"no artifact {artifact_id}: a trial's weights are deleted once it is "
                                   "dominated")  # fmt: skip
        return path.open("rb")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        if not is_weights_id(artifact_id):
            raise bottle.HTTPError(400, f"artifact id {artifact_id!r} is not a UUID")
        self.folders[0].mkdir(parents=True, exist_ok=True)
        with (self.folders[0] / artifact_id).open("xb") as file:  # a new id: never over a file or through a link
            shutil.copyfileobj(content_body, file)

    def remove(self, artifact_id: str) -> None:
        """Remove the artifact's file; one already gone (a pruned trial's weights, whose record Optuna keeps) or no
        weights file of ours is nothing to do, so that deleting a study never stops half-way."""
        path = self._file(artifact_id)
        if path is not None:
            path.unlink(missing_ok=True)


def weights_stores(storage_url: str, storage: optuna.storages.BaseStorage,
                   server_folders: dict[str, str] | None = None) -> WeightsStores | None:  # fmt: skip
    """The kept weights of the storage's studies, in the folders derived from ``storage_url``
    (``storage.weights_folder``; ``server_folders``: a study's folder on a server storage, by study name), never from
    a path recorded in a study; None when no folder exists. A study whose name is no name has none."""
    folders = set()
    for study in storage.get_all_studies():
        try:
            folder = weights_folder(storage_url, study.study_name, (server_folders or {}).get(study.study_name))
        except UserError:
            continue
        if folder.is_dir():
            folders.add(folder.resolve())
    return WeightsStores(sorted(folders)) if folders else None


def make_app(storage_url: str, server_folders: dict[str, str] | None = None) -> Callable:
    """The optuna-dashboard WSGI app (a bottle app) for every study in ``storage_url``, with their kept weights as
    downloadable artifacts (``server_folders``: see ``weights_stores``); UserError if the storage cannot be
    opened."""
    storage = open_storage(storage_url)
    return optuna_dashboard.wsgi(storage, artifact_store=weights_stores(storage_url, storage, server_folders))


def study_path(storage_url: str, study_name: str) -> str:
    """The dashboard's page of ``study_name`` (``/dashboard/studies/<id>``); UserError if there is no such study."""
    load_existing_study(storage_url, study_name)
    return f"/dashboard/studies/{open_storage(storage_url).get_study_id_from_name(study_name)}"


def _addresses(host: str) -> list[str]:
    """The addresses ``host`` names (an IP address in any form ``inet_aton`` reads, like 127.1, or a name the
    resolver knows); none when it resolves to nothing (binding then fails in one line)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [info[4][0] for info in infos]


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (127.0.0.0/8, ::1): 127.1, 127.0.0.2, ::1 and
    localhost are; 0.0.0.0 (every address) and a name that resolves to nothing are not."""
    addresses = _addresses(host)
    try:
        return bool(addresses) and all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)
    except ValueError:
        return False


def check_host(host: str) -> str:
    """``host`` to listen on: an empty one (every address, said by nothing) or one with spaces around it is refused;
    a non-loopback one is served with a warning, since the dashboard has no login and can delete studies."""
    if not host.strip():
        raise UserError("--host is empty, which would listen on every address of this machine; pass 127.0.0.1 "
                        "(the default), or 0.0.0.0 to serve the network on purpose")  # fmt: skip
    if host != host.strip():
        raise UserError(f"--host {host!r} has spaces around it; pass --host {host.strip()}")
    if _addresses(host) and not is_loopback(host):  # a host that resolves to nothing fails to bind, in one line
        print(f"warning: serving on {host}: anyone who can reach this machine can read and delete the studies "
              "(the dashboard has no login); --host 127.0.0.1 keeps it to this machine", file=sys.stderr)  # fmt: skip
    return host


class _ThreadedServer6(_ThreadedServer):
    address_family = socket.AF_INET6


def _server_class(host: str) -> type[WSGIServer]:
    """An IPv6 server for a host whose first address is IPv6 (::1), else an IPv4 one."""
    addresses = _addresses(host)
    return _ThreadedServer6 if addresses and ":" in addresses[0] else _ThreadedServer


def make_dashboard_server(storage_url: str, host: str = "127.0.0.1", port: int = 8080,
                          server_folders: dict[str, str] | None = None) -> WSGIServer:  # fmt: skip
    """A bound, not yet serving, server of the dashboard (port 0: any free port; ``server_folders``: see
    ``weights_stores``); UserError if it cannot bind or ``host`` is empty (``check_host``)."""
    check_host(host)
    app = make_app(storage_url, server_folders)
    try:
        return make_server(host, port, app, server_class=_server_class(host), handler_class=_QuietHandler)
    except (OSError, OverflowError) as error:  # OverflowError: a port outside 0..65535
        raise UserError(f"cannot serve on {host}:{port} ({first_line(error)}); pass another --port / --host") from None


def server_url(server: WSGIServer, path: str = "/dashboard") -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{path}"


def serve(storage_url: str, host: str = "127.0.0.1", port: int = 8080, study_name: str | None = None,
          weights_dir: str | None = None) -> None:  # fmt: skip
    """Serve the dashboard until Ctrl-C (blocking, then returns); prints its URL first (the study's page if
    ``study_name``; ``weights_dir``: that study's weights folder on a server storage). UserError for a bad storage,
    an unknown study or a port that cannot be bound."""
    path = study_path(storage_url, study_name) if study_name else "/dashboard"
    folders = {study_name: weights_dir} if study_name and weights_dir else None
    server = make_dashboard_server(storage_url, host, port, folders)
    print(f"optuna-dashboard on {server_url(server, path)} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        server.server_close()
