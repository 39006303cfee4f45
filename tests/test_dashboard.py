"""optuna-dashboard on a hand-built study: its JSON API returns the trials and their user attrs; clear errors."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import warnings
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from test_report import BASELINE, DIST, PARETO, TRIALS, _params, hand_built_study

from conftest import REPO
from ranksearch.inspect.dashboard import make_app, make_dashboard_server, server_url, study_path
from ranksearch.study.weights import WeightsStore
from ranksearch.utils.errors import UserError

SERVE_FIRST_LINE = r"optuna-dashboard on (http://127\.0\.0\.1:\d+/dashboard/studies/\d+) \(Ctrl-C to stop\)\n"


@pytest.fixture
def storage(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/s.db"
    hand_built_study(url)
    return url


def wsgi_get(app, path: str) -> tuple[str, bytes]:
    """Call the WSGI app directly, as a server would for ``GET path``; returns (status, body)."""
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    started = {}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.setdefault("status", status)))
    return started["status"], body


def get_json(app, path: str) -> dict:
    status, body = wsgi_get(app, path)
    assert status.startswith("200"), (status, body[:200])
    return json.loads(body)


def attrs(serialized: list[dict]) -> dict[str, str]:
    """optuna-dashboard sends attrs as [{key, value}], the value as text (JSON for dicts and lists)."""
    return {a["key"]: a["value"] for a in serialized}


def study_id(app, name: str = "s") -> int:
    summaries = get_json(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == [name]
    assert summaries[0]["directions"] == ["maximize", "minimize"]
    return summaries[0]["study_id"]


def test_api_returns_every_trial_with_its_user_attrs(storage):
    app = make_app(storage)
    detail = get_json(app, f"/api/studies/{study_id(app)}")
    trials = detail["trials"]
    assert [t["number"] for t in trials] == list(range(len(TRIALS) + 1))
    assert [t["state"] for t in trials] == ["Complete"] * len(TRIALS) + ["Fail"]
    for trial, (ranks, accuracy, macs, params) in zip(trials, TRIALS, strict=False):
        user_attrs = attrs(trial["user_attrs"])
        assert float(user_attrs["macs_ratio"]) == pytest.approx(macs / 1000)
        assert trial["values"] == [accuracy, macs] and float(user_attrs["params_ratio"]) == params / 200
        assert user_attrs["ranks"] == "/".join(map(str, ranks)) + " /32"  # text, as the dashboard shows it
        assert json.loads(user_attrs["conv_ranks"]) == {f"features.{i}": 4 * k for i, k in enumerate(ranks)}
        assert json.loads(user_attrs["kept_convs"]) == ["features.0"]
        params_k = {p["name"]: round(float(p["param_external_value"]) * 32) for p in trial["params"]}
        assert params_k == {f"rank_block{i + 1}": k for i, k in enumerate(ranks)}
    assert attrs(trials[-1]["user_attrs"]) == {"fail_reason": "RuntimeError: CUDA out of memory"}
    assert {t["number"] for t in detail["best_trials"]} == PARETO
    assert json.loads(attrs(detail["user_attrs"])["baseline"]) == BASELINE


def test_server_on_a_free_port_serves_the_api_and_the_study_page(storage):
    server = make_dashboard_server(storage, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page = study_path(storage, "s")
        url = server_url(server, page)
        assert url.startswith("http://127.0.0.1:") and server.server_address[1] != 0
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        api = server_url(server, f"/api/studies/{page.rsplit('/', 1)[1]}")
        with urllib.request.urlopen(api, timeout=30) as response:
            detail = json.loads(response.read())
        assert len(detail["trials"]) == len(TRIALS) + 1
        assert {t["number"] for t in detail["best_trials"]} == PARETO
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_missing_sqlite_file_is_a_user_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(UserError, match="no study database .*nope.db"):
        make_app(f"sqlite:///{missing}")
    assert not missing.exists()


def test_unusable_storage_url_is_a_user_error():
    with pytest.raises(UserError, match="cannot open storage 'nosuchdb://x'"):
        make_app("nosuchdb://x")


def test_unknown_study_is_a_user_error(storage):
    with pytest.raises(UserError, match="no study 'other' .*studies there: s"):
        study_path(storage, "other")


def test_busy_port_is_a_user_error(storage):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}.*--port"):
            make_dashboard_server(storage, "127.0.0.1", port)


def _ctrl_c_as_a_terminal_gives_it() -> None:
    """SIGINT at its default in the child, so that Python makes it KeyboardInterrupt: a suite started in the
    background (``nohup ... &``) ignores SIGINT, and a child would inherit that and never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_prints_the_study_url_serves_it_and_stops_on_ctrl_c(storage):
    code = f"from ranksearch.inspect.dashboard import serve; serve({storage!r}, '127.0.0.1', 0, study_name='s')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ctrl_c_as_a_terminal_gives_it,
    )
    try:
        first_line = process.stdout.readline()  # blocks until serve has bound its port and printed the URL
        match = re.fullmatch(SERVE_FIRST_LINE, first_line)
        assert match, (first_line, process.stderr.read() if process.poll() is not None else "")
        with urllib.request.urlopen(match[1], timeout=30) as response:
            assert response.status == 200
        api = match[1].replace("/dashboard/studies/", "/api/studies/")
        with urllib.request.urlopen(api, timeout=30) as response:
            assert len(json.loads(response.read())["trials"]) == len(TRIALS) + 1
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert stdout == "dashboard stopped\n" and "GET /" not in stderr  # no log line per request


def add_trial_with_weights(study: optuna.Study, store, ks: list[int], values: list[float], folder) -> tuple[int, str]:
    """A trial run as ranksearch runs one: its weights uploaded while it runs, its ranks as text; returns
    (trial number, artifact id)."""
    study.enqueue_trial(_params(ks))
    trial = study.ask({name: DIST for name in _params(ks)})
    weights = folder / f"trial-{trial.number}.pt"
    weights.write_bytes(b"state_dict of trial %d" % trial.number)
    artifact_id = upload_artifact(artifact_store=store, file_path=str(weights), study_or_trial=trial)
    trial.set_user_attr("ranks", "/".join(map(str, ks)) + " /32")
    study.tell(trial, values)
    return trial.number, artifact_id


@pytest.fixture
def weighted(tmp_path) -> tuple[str, dict[int, str]]:
    """The hand-built study as a run leaves it: metric names, a weights folder, two trials with weights of which
    the dominated one's were deleted again (as ``WeightsStore.prune`` does)."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = hand_built_study(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "macs"])  # as run_search names them
    study.set_user_attr("weights_dir", str(tmp_path / "s-weights"))
    (tmp_path / "s-weights").mkdir()
    store = FileSystemArtifactStore(tmp_path / "s-weights")
    kept = dict([
        add_trial_with_weights(study, store, [8, 8, 4, 2, 2], [0.92, 50.0], tmp_path),  # dominates everything
        add_trial_with_weights(study, store, [1, 1, 1, 1, 2], [0.50, 900.0], tmp_path),
    ])  # fmt: skip
    store.remove(kept[len(TRIALS) + 2])
    return url, kept


def trial_detail(app, number: int, sid: int | None = None) -> dict:
    """Trial ``number`` of study ``sid`` (default: the only study) as the API sends it."""
    trials = get_json(app, f"/api/studies/{study_id(app) if sid is None else sid}")["trials"]
    return next(t for t in trials if t["number"] == number)


def test_kept_weights_are_listed_and_downloadable_and_deleted_ones_answer_404(weighted):
    url, kept = weighted
    best, dominated = len(TRIALS) + 1, len(TRIALS) + 2
    app = make_app(url)
    assert get_json(app, "/api/meta")["artifact_is_available"]
    trial = trial_detail(app, best)
    assert [(a["artifact_id"], a["filename"]) for a in trial["artifacts"]] == [(kept[best], f"trial-{best}.pt")]
    status, body = wsgi_get(app, f"/artifacts/{study_id(app)}/{trial['trial_id']}/{kept[best]}")
    assert status.startswith("200") and body == b"state_dict of trial %d" % best
    gone = trial_detail(app, dominated)  # the study still lists it; the file is gone
    assert [a["artifact_id"] for a in gone["artifacts"]] == [kept[dominated]]
    status, body = wsgi_get(app, f"/artifacts/{study_id(app)}/{gone['trial_id']}/{kept[dominated]}")
    assert status.startswith("404") and b"weights are deleted once it is dominated" in body


def test_objectives_are_named_and_ranks_read_as_text(weighted):
    app = make_app(weighted[0])
    assert get_json(app, f"/api/studies/{study_id(app)}")["objective_names"] == ["val_accuracy", "macs"]
    trial = trial_detail(app, len(TRIALS) + 1)
    assert attrs(trial["user_attrs"])["ranks"] == "8/8/4/2/2 /32"
    assert [round(float(p["param_external_value"]) * 32) for p in trial["params"]] == [8, 8, 4, 2, 2]


def test_without_a_weights_folder_the_dashboard_has_no_artifacts(weighted, tmp_path):
    (tmp_path / "s-weights").rename(tmp_path / "moved")
    assert not get_json(make_app(weighted[0]), "/api/meta")["artifact_is_available"]


def test_each_study_in_a_storage_serves_its_own_weights(weighted, tmp_path):
    url, kept = weighted
    other = optuna.create_study(storage=url, study_name="t", directions=["maximize", "minimize"])
    other.set_user_attr("weights_dir", str(tmp_path / "t-weights"))
    (tmp_path / "t-weights").mkdir()
    number, artifact_id = add_trial_with_weights(other, FileSystemArtifactStore(tmp_path / "t-weights"),
                                                 [2, 2, 2, 2, 2], [0.8, 100.0], tmp_path)  # fmt: skip
    app = make_app(url)
    studies = {s["study_name"]: s["study_id"] for s in get_json(app, "/api/studies")["study_summaries"]}
    for name, trial_number, artifact in (("s", len(TRIALS) + 1, kept[len(TRIALS) + 1]), ("t", number, artifact_id)):
        trial = trial_detail(app, trial_number, studies[name])
        status, body = wsgi_get(app, f"/artifacts/{studies[name]}/{trial['trial_id']}/{artifact}")
        assert status.startswith("200") and body == b"state_dict of trial %d" % trial_number


def test_after_a_prune_front_weights_download_and_pruned_ones_answer_404_with_the_reason(tmp_path):
    """What ``WeightsStore.prune`` leaves for the dashboard: Optuna keeps a finished trial's artifact record, so a
    pruned trial still lists its weights, and downloading them says why they are gone."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = hand_built_study(url)
    study.set_user_attr("weights_dir", str(tmp_path / "s-weights"))
    store = WeightsStore(tmp_path / "s-weights")
    for ks, values in (([8, 8, 4, 2, 2], [0.92, 50.0]), ([1, 1, 1, 1, 2], [0.50, 900.0])):  # the first dominates all
        study.enqueue_trial(_params(ks))
        trial = study.ask({name: DIST for name in _params(ks)})
        store.save(trial, torch.nn.Linear(1, 1))
        study.tell(trial, values)
    store.prune(study)
    app = make_app(url)
    best, dominated = len(TRIALS) + 1, len(TRIALS) + 2
    assert {t.number for t in study.best_trials} == {best}
    answers = {}
    for number in (best, dominated):
        trial = trial_detail(app, number)
        (artifact,) = trial["artifacts"]
        answers[number] = wsgi_get(app, f"/artifacts/{study_id(app)}/{trial['trial_id']}/{artifact['artifact_id']}")
    status, body = answers[best]
    kept = store.load(study.trials[best])
    assert status.startswith("200") and torch.load(io.BytesIO(body), weights_only=True).keys() == kept.keys()
    status, body = answers[dominated]
    assert status.startswith("404") and b"weights are deleted once it is dominated" in body


def test_deleting_a_study_whose_pruned_trial_lost_its_weights_deletes_it_whole(tmp_path):
    """The dashboard's "delete study" answered HTTP 500 half-way on a pruned trial without weights: the Pareto
    weights were deleted and the study kept."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = hand_built_study(url)
    study.set_user_attr("weights_dir", str(tmp_path / "s-weights"))
    store = WeightsStore(tmp_path / "s-weights")
    for ks, values in (([8, 8, 4, 2, 2], [0.92, 50.0]), ([1, 1, 1, 1, 2], [0.50, 900.0])):
        study.enqueue_trial(_params(ks))
        trial = study.ask({name: DIST for name in _params(ks)})
        store.save(trial, torch.nn.Linear(1, 1))
        study.tell(trial, values)
    store.prune(study)  # the dominated trial's weights are gone, its artifact record stays
    app = make_app(url)
    environ = {"PATH_INFO": f"/api/studies/{study_id(app)}", "REQUEST_METHOD": "DELETE",
               "wsgi.input": io.BytesIO(b"{}"), "CONTENT_LENGTH": "2", "CONTENT_TYPE": "application/json"}  # fmt: skip
    setup_testing_defaults(environ)
    started = {}
    app(environ, lambda status, headers, exc_info=None: started.setdefault("status", status))
    assert started["status"].startswith("204") or started["status"].startswith("200"), started
    assert optuna.get_all_study_summaries(url) == []  # the study went too
    assert [p for p in (tmp_path / "s-weights").rglob("*") if p.is_file()] == []  # and every weights file
