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
from wsgiref.util import setup_testing_defaults

import pytest
from test_report import BASELINE, PARETO, TRIALS, hand_built_study

from conftest import REPO
from ranksearch.dashboard import make_app, make_dashboard_server, server_url, study_path
from ranksearch.errors import UserError

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
        assert float(user_attrs["val_accuracy"]) == accuracy and float(user_attrs["params_ratio"]) == params / 200
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


def test_serve_prints_the_study_url_serves_it_and_stops_on_ctrl_c(storage):
    code = f"from ranksearch.dashboard import serve; serve({storage!r}, '127.0.0.1', 0, study_name='s')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert stdout == "dashboard stopped\n" and "GET /" not in stderr  # no log line per request
