"""Issue 24, "Files stay where the study is": kept weights live beside the study's database, never where a path
recorded in the study points (S2, D3); the dashboard's host check (U) and its delete during a run (T)."""

import io
import json
import shutil
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from test_dashboard import wsgi_get

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.inspect.dashboard import check_host, is_loopback, make_app, make_dashboard_server
from ranksearch.study.weights import WeightsStore, is_weights_id
from ranksearch.utils.errors import UserError

RANKS = ("--ranks", "8/32,8/32,8/32,8/32,8/32", "--ranks", "2/32,2/32,2/32,2/32,2/32")


@pytest.fixture
def smoke_study(workdir, tiny_imagefolder) -> Path:
    """A real smoke study of two trials with kept weights: ``studies/smoke.db`` and ``studies/smoke-weights``."""
    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "2", *RANKS,
                  cwd=workdir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert weight_files(workdir / "studies" / "smoke-weights")
    return workdir


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def copy_study(workdir: Path, to: str) -> Path:
    """The smoke study's database and weights folder copied into ``workdir/to``, as a user copies a study."""
    folder = workdir / to
    folder.mkdir()
    shutil.copy(workdir / "studies" / "smoke.db", folder / "smoke.db")
    shutil.copytree(workdir / "studies" / "smoke-weights", folder / "smoke-weights")
    return folder


def delete_study(url: str, name: str = "smoke") -> str:
    """The dashboard's ``DELETE /api/studies/<id>`` (with its artifacts, the dashboard's default); the status."""
    app = make_app(url)
    study_id = optuna.storages.RDBStorage(url).get_study_id_from_name(name)
    body = json.dumps({"remove_associated_artifacts": True}).encode()
    environ = {"PATH_INFO": f"/api/studies/{study_id}", "REQUEST_METHOD": "DELETE", "wsgi.input": io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json"}  # fmt: skip
    setup_testing_defaults(environ)
    started = {}
    b"".join(app(environ, lambda status, headers, exc_info=None: started.setdefault("status", status)))
    return started["status"]


def record_artifact(url: str, artifact_id: str) -> None:
    """A study artifact record naming ``artifact_id``, as a tampered database holds it."""
    storage = optuna.storages.RDBStorage(url)
    meta = {"artifact_id": artifact_id, "filename": "w.pt", "mimetype": "application/octet-stream", "encoding": None}
    study_id = storage.get_study_id_from_name("smoke")
    storage.set_study_system_attr(study_id, f"artifacts:{artifact_id}", json.dumps(meta))


def test_a_copied_study_pointing_at_another_folder_deletes_nothing_there(smoke_study):
    """S2: a copied database with its ``weights_dir`` attr set to another folder and artifact records naming files
    there: the dashboard's delete removed them (HTTP 204)."""
    copy = copy_study(smoke_study, "copy")
    outside = smoke_study / "outside"
    outside.mkdir()
    victims = {"precious.txt": b"mine", "0b7e4bd4-2f5c-4c1e-9a57-3c1d4e5f6a7b": b"looks like weights"}
    for name, content in victims.items():
        (outside / name).write_bytes(content)
    url = f"sqlite:///{copy / 'smoke.db'}"
    optuna.load_study(study_name="smoke", storage=url).set_user_attr("weights_dir", str(outside))
    for name in (*victims, "../outside/precious.txt", str(outside / "precious.txt")):
        record_artifact(url, name)
    original = weight_files(smoke_study / "studies" / "smoke-weights")
    status = delete_study(url)
    assert weight_files(outside) == victims  # nothing outside the copy's own folder is touched
    assert status.startswith("204") and optuna.get_all_study_summaries(url) == []
    assert weight_files(copy / "smoke-weights") == {}  # the copy's own weights go with it
    assert weight_files(smoke_study / "studies" / "smoke-weights") == original


def test_deleting_a_copied_study_leaves_the_originals_weights(smoke_study):
    """D3: the dashboard's delete on a copied study deleted the ORIGINAL's kept weights (an absolute path was
    recorded); the copy's own weights (beside its database) are deleted instead, and export reads the copy's."""
    copy = copy_study(smoke_study, "copy")
    original = weight_files(smoke_study / "studies" / "smoke-weights")
    url = f"sqlite:///{copy / 'smoke.db'}"
    recorded = optuna.load_study(study_name="smoke", storage=url).user_attrs["weights_dir"]
    assert Path(recorded) == (smoke_study / "studies" / "smoke-weights").resolve()  # what the run recorded
    assert delete_study(url).startswith("204")
    assert weight_files(copy / "smoke-weights") == {}
    assert weight_files(smoke_study / "studies" / "smoke-weights") == original


def test_export_reads_the_weights_beside_the_database_not_the_recorded_folder(smoke_study):
    """export took the weights from the recorded ``weights_dir``: a copy exported the original's files."""
    copy = copy_study(smoke_study, "copy")
    shutil.rmtree(smoke_study / "studies" / "smoke-weights")  # the recorded folder is gone; the copy's is there
    export = run_cli("export", "--study-name", "smoke", "--storage", f"sqlite:///{copy / 'smoke.db'}", "--trial",
                     "0", "--out", "x.pt", cwd=smoke_study)  # fmt: skip
    assert export.returncode == 0, export.stderr
    assert "weights kept with the study" in export.stdout


def test_weights_dir_is_refused_for_a_sqlite_study(smoke_study, tiny_imagefolder):
    """A SQLite study's weights are beside its database; ``weights_dir`` (config) and ``--weights-dir`` (export,
    dashboard) are for server storages and refused with SQLite in one line."""
    config = smoke_study / "c.yaml"
    config.write_text(SMOKE_CONFIG.read_text() + "weights_dir: elsewhere\n")
    run = run_cli("run", "--config", str(config), "--data-dir", str(tiny_imagefolder), cwd=smoke_study)
    assert run.returncode == 2 and "weights_dir 'elsewhere': a SQLite study keeps its weights beside" in run.stderr
    assert "studies/smoke-weights" in run.stderr and not (smoke_study / "elsewhere").exists()
    for command in (["export", "--out", "x.pt"], ["dashboard", "--port", "0"]):
        result = run_cli(*command, "--study-name", "smoke", "--weights-dir", "elsewhere", cwd=smoke_study)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "--weights-dir is for server storages (PostgreSQL)" in result.stderr


NO_UUIDS = ["../x", "/etc/passwd", "a/b", "..", "", "{0b7e4bd4-2f5c-4c1e-9a57-3c1d4e5f6a7b}",
            "0B7E4BD4-2F5C-4C1E-9A57-3C1D4E5F6A7B"]  # fmt: skip


@pytest.mark.parametrize("artifact_id", NO_UUIDS)
def test_an_artifact_id_that_is_no_uuid_reads_and_removes_nothing(tmp_path, artifact_id):
    """The dashboard's store reads and removes only files of the form the weights store writes."""
    from ranksearch.inspect.dashboard import WeightsStores

    folder = tmp_path / "s-weights"
    folder.mkdir()
    (tmp_path / "x").write_bytes(b"outside")
    assert not is_weights_id(artifact_id)
    stores = WeightsStores([folder])
    stores.remove(artifact_id)
    with pytest.raises(Exception, match="no artifact"):
        stores.open_reader(artifact_id)
    assert (tmp_path / "x").read_bytes() == b"outside"


def test_the_weights_store_skips_a_recorded_id_with_a_path_in_it(tmp_path):
    """``WeightsStore.load`` and ``prune`` take the artifact id from a trial's attrs: one with a path in it is no
    weights of ours (load: none kept; prune: nothing removed)."""
    (tmp_path / "x").write_bytes(b"outside")
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values, weights in (([0.9, 1.0], "../x"), ([0.1, 2.0], "../x")):
        trial = study.ask()
        trial.set_user_attr("weights", weights)
        study.tell(trial, values)
    store = WeightsStore(tmp_path / "w")
    assert store.load(study.trials[0]) is None
    store.prune(study)
    assert (tmp_path / "x").read_bytes() == b"outside"


@pytest.mark.parametrize("host", ["127.1", "127.0.0.2", "::1", "localhost", "127.0.0.1"])
def test_loopback_hosts_are_served_without_a_warning(host, capsys):
    """U: ``dashboard --host 127.1`` was warned as public."""
    assert is_loopback(host)
    assert check_host(host) == host
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "8.8.8.8", "::"])
def test_public_hosts_are_warned(host, capsys):
    assert not is_loopback(host)
    check_host(host)
    assert f"warning: serving on {host}" in capsys.readouterr().err


@pytest.mark.parametrize("host", [" 127.0.0.1", "127.0.0.1 ", "\t::1"])
def test_a_host_with_spaces_around_it_is_refused_in_one_line(host, tmp_path, capsys):
    """U: ``--host ' 127.0.0.1'`` was warned as public, then failed to bind."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    optuna.create_study(storage=url, study_name="d")
    with pytest.raises(UserError, match=r"--host .* has spaces around it; pass --host (127\.0\.0\.1|::1)$"):
        make_dashboard_server(url, host, 0)
    assert "warning" not in capsys.readouterr().err


def test_a_host_that_resolves_to_nothing_fails_in_one_line_without_a_warning(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    optuna.create_study(storage=url, study_name="d")
    with pytest.raises(UserError, match="cannot serve on no-such-host.invalid:0"):
        make_dashboard_server(url, "no-such-host.invalid", 0)
    assert "warning" not in capsys.readouterr().err


def test_the_dashboard_serves_on_127_1(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    optuna.create_study(storage=url, study_name="d")
    server = make_dashboard_server(url, "127.1", 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    assert "warning" not in capsys.readouterr().err


def _deleting(monkeypatch, module, name: str, url: str, at_call: int) -> None:
    """``module.name`` deletes the study (as the dashboard's delete does) at its ``at_call``-th call, then runs."""
    original, calls = getattr(module, name), []

    def deleting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            optuna.delete_study(study_name="smoke", storage=url)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(module, name, deleting)


@pytest.mark.parametrize("where", ["in a trial", "between trials"])
def test_a_study_deleted_while_a_run_works_on_it_ends_the_run_in_one_line(where, workdir, tiny_imagefolder,
                                                                          monkeypatch):  # fmt: skip
    """T: the dashboard's delete while a run works on the study: the run died with 3 chained tracebacks."""
    url = f"sqlite:///{workdir}/studies/smoke.db"
    if where == "in a trial":  # the second trial's weights are being saved
        _deleting(monkeypatch, WeightsStore, "save", url, at_call=2)
    else:  # the first trial is told; its prune callback runs
        _deleting(monkeypatch, WeightsStore, "prune", url, at_call=1)
    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "3",
                  cwd=workdir)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "ranksearch: error: study 'smoke' was deleted while this run worked on it (from optuna-dashboard or another "
        "program), with its trials; run again to start it anew"
    )


def test_weights_of_a_trial_beside_the_database(tmp_path):
    """The folder is derived from the storage: beside a SQLite file; for a server storage, the config's."""
    from ranksearch.study.storage import weights_folder

    assert weights_folder(f"sqlite:///{tmp_path}/a/s.db", "s") == tmp_path / "a" / "s-weights"
    assert weights_folder("sqlite:///studies/s.db", "s") == Path("studies/s-weights")
    assert weights_folder("postgresql+psycopg://u@h/db", "s") == Path("studies/s-weights")
    assert weights_folder("postgresql+psycopg://u@h/db", "s", "/w") == Path("/w")
    with pytest.raises(UserError, match="is not a name"):
        weights_folder(f"sqlite:///{tmp_path}/s.db", "../../etc")


def test_a_server_storage_serves_the_weights_of_its_folder_in_the_working_folder(postgres_url, tmp_path, monkeypatch):
    """On PostgreSQL (no file location), the weights folder is the command's own: ``studies/<name>-weights`` in the
    working folder, or ``--weights-dir``; never the path the study records."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(storage=postgres_url, study_name="s")
    study.set_user_attr("weights_dir", str(tmp_path / "recorded"))
    downloads = {}
    for folder in (Path("studies/s-weights"), tmp_path / "given"):
        folder.mkdir(parents=True)
        (tmp_path / "w.pt").write_bytes(str(folder).encode())
        trial = study.ask()
        artifact_id = upload_artifact(artifact_store=FileSystemArtifactStore(folder), file_path=str(tmp_path / "w.pt"),
                                      study_or_trial=trial)  # fmt: skip
        study.tell(trial, 1.0)
        downloads[folder] = (trial._trial_id, artifact_id)
    given = {"s": str(tmp_path / "given")}
    for server_folders, served in ((None, Path("studies/s-weights")), (given, tmp_path / "given")):
        app = make_app(postgres_url, server_folders)
        for folder, (trial_id, artifact_id) in downloads.items():
            status, body = wsgi_get(app, f"/artifacts/{study._study_id}/{trial_id}/{artifact_id}")
            if folder == served:
                assert status.startswith("200") and body == str(folder).encode()
            else:
                assert status.startswith("404")
