"""`MLflowSink` against real MLflow: a local sqlite store and real `mlflow server` processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import warnings

import mlflow
import pytest
import torch
from helpers import free_port
from mlflow import MlflowClient

from sparsity_callbacks.cli import main as cli_main
from sparsity_callbacks.config import SparsityConfig
from sparsity_callbacks.sinks.mlflow import MLflowSink, MLflowSinkWarning, _sanitise_key

STEPS = (0, 10, 20)


pytestmark = pytest.mark.slow  # real MLflow servers, outages and retries


def _metrics(step: int) -> dict[str, float]:
    return {
        "sparsity/changed_fraction": 0.01 * step,
        "sparsity/ever_changed_fraction": 0.02 * step,
        "sparsity/changed_fraction_by_module/self_attn.q_proj": 0.005 * step,
        "sparsity/changed_fraction_by_layer/layer_00": 0.001 * step,
    }


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _unreachable_warnings(records) -> list[warnings.WarningMessage]:
    return [w for w in records if issubclass(w.category, MLflowSinkWarning) and "unreachable" in str(w.message)]


def test_metrics_params_and_artifacts_reach_the_server(mlflow_server, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"changed_fraction": 0.2}))
    sink = MLflowSink(tracking_uri=mlflow_server, experiment="sink-basic", run_name="basic")
    sink.log_params(SparsityConfig(mode="exact").to_params())
    for step in STEPS:
        sink.log_metrics(_metrics(step), step=step)
    sink.log_artifact(str(report))
    report.unlink()  # the sink took its own link/copy
    assert sink.flush(timeout=60)
    run_id = sink.run_id
    sink.close()

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "basic"
    assert client.get_experiment(run.info.experiment_id).name == "sink-basic"
    assert run.data.params["sparsity.mode"] == "exact"
    assert run.data.params["sparsity.every_n_steps"] == "None"
    for key, value in _metrics(20).items():
        assert _history(client, run_id, key) == [(s, pytest.approx(_metrics(s)[key])) for s in STEPS]
        assert run.data.metrics[key] == pytest.approx(value)
    assert [a.path for a in client.list_artifacts(run_id, "sparsity")] == ["sparsity/report.json"]
    downloaded = client.download_artifacts(run_id, "sparsity/report.json", str(tmp_path))
    assert json.loads(open(downloaded).read()) == {"changed_fraction": 0.2}


def test_reuses_the_active_run_and_leaves_it_open(mlflow_local):
    experiment_id = mlflow.set_experiment("hf-like").experiment_id
    with mlflow.start_run() as active:
        sink = MLflowSink()
        sink.log_metrics(_metrics(10), step=10)
        sink.close()
        assert sink.run_id == active.info.run_id
        assert MlflowClient().get_run(active.info.run_id).info.status == "RUNNING"
    runs = MlflowClient().search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [active.info.run_id]
    assert runs[0].data.metrics["sparsity/changed_fraction"] == pytest.approx(0.1)


def test_explicit_run_id_is_used_and_not_terminated(mlflow_local):
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    with mlflow.start_run():  # an unrelated active run must not win over the explicit id
        sink = MLflowSink(run_id=run_id)
        sink.log_metrics(_metrics(20), step=20)
        sink.close()
    assert _history(client, run_id, "sparsity/changed_fraction") == [(20, pytest.approx(0.2))]
    assert client.get_run(run_id).info.status == "RUNNING"


def test_creates_its_own_run_and_finishes_it(mlflow_local):
    sink = MLflowSink(experiment="own-run", run_name="sparsity")
    for step in STEPS:
        sink.log_metrics(_metrics(step), step=step)
    sink.close()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("own-run")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == sink.run_id
    assert runs[0].info.status == "FINISHED"
    assert runs[0].info.run_name == "sparsity"
    assert [s for s, _ in _history(client, sink.run_id, "sparsity/changed_fraction")] == list(STEPS)


def test_own_run_uses_the_tracking_uri_env_read_at_first_use(
    mlflow_local, mlflow_sqlite_template, tmp_path, monkeypatch
):
    sink = MLflowSink()  # constructed before the env var is set
    shutil.copyfile(mlflow_sqlite_template, tmp_path / "other.db")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    sink.log_metrics({"sparsity/changed_fraction": 0.5}, step=1)
    sink.close()
    assert sink.tracking_uri == other
    assert _history(MlflowClient(other), sink.run_id, "sparsity/changed_fraction") == [(1, 0.5)]


def test_disabled_sink_writes_nothing(mlflow_local, tmp_path):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    sink = MLflowSink(enabled=False, experiment="should-not-exist")
    sink.log_params({"a": "1"})
    sink.log_metrics({"sparsity/changed_fraction": 0.5}, step=1)
    sink.log_artifact(str(artifact))
    assert sink.flush(timeout=1)
    sink.close()
    assert sink.run_id is None
    client = MlflowClient()
    assert client.get_experiment_by_name("should-not-exist") is None
    assert client.search_runs(["0"]) == []
    assert sink._worker is None


def test_keys_are_sanitised_with_a_single_warning(mlflow_local):
    bad = {"sparsity/tensor/h[0].attn/changed_fraction": 0.1, "sparsity//weird key?": 0.2, "ok/key": 0.3}
    sink = MLflowSink(experiment="keys")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        sink.log_metrics(bad, step=1)
        sink.log_metrics(bad, step=2)
    renamed = [w for w in records if "renamed" in str(w.message)]
    assert len(renamed) == 1
    assert "'sparsity//weird key?' -> 'sparsity/weird key_'" in str(renamed[0].message)
    sink.close()
    metrics = MlflowClient().get_run(sink.run_id).data.metrics
    assert set(metrics) == {"sparsity/tensor/h_0_.attn/changed_fraction", "sparsity/weird key_", "ok/key"}


@pytest.mark.parametrize(
    ("key", "expected"),
    [("a/b", "a/b"), ("/a//b/", "a/b"), ("a/./b", "a/_/b"), ("..a", "_.a"), ("é:x", "_:x"), ("", "_")],
)
def test_sanitise_key(key, expected):
    assert _sanitise_key(key) == expected


def test_large_payloads_are_split_into_mlflow_sized_batches(mlflow_local):
    sink = MLflowSink(experiment="big")
    params = {f"p{i}": str(i) for i in range(250)}
    metrics = {f"m/{i}": float(i) for i in range(2500)}
    sink.log_params(params)
    sink.log_metrics(metrics, step=3)
    sink.log_metrics({"m/0": 1.0}, step=4)
    assert sink.flush(timeout=120)
    sink.close()
    run = MlflowClient().get_run(sink.run_id)
    assert run.data.params == params
    assert len(run.data.metrics) == 2500
    assert _history(MlflowClient(), sink.run_id, "m/0") == [(3, 0.0), (4, 1.0)]


def test_non_numeric_values_are_skipped_and_tensors_accepted(mlflow_local):
    sink = MLflowSink(experiment="values")
    with pytest.warns(MLflowSinkWarning, match="non-numeric value"):
        sink.log_metrics({"bad": "x", "good": torch.tensor(0.25)}, step=0)
    sink.close()
    assert MlflowClient().get_run(sink.run_id).data.metrics == {"good": 0.25}


def test_refused_data_is_kept_in_the_fallback_file(mlflow_local, tmp_path):
    sink = MLflowSink(run_id="0123456789abcdef0123456789abcdef", fallback_dir=str(tmp_path / "fb"))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for step in STEPS:
            sink.log_metrics(_metrics(step), step=step)
        assert not sink.flush(timeout=30)
        sink.close(timeout=5)
    refused = [w for w in records if "refused metrics" in str(w.message)]
    assert len(refused) == 1
    assert any("could not be delivered" in str(w.message) for w in records)
    (path,) = (tmp_path / "fb").glob("sparsity_mlflow_fallback_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(len(r["metrics"]) for r in rows if r["type"] == "metrics") == 3 * len(_metrics(0))


def test_outage_with_restart_loses_nothing_and_warns_once(mlflow_server_outage, caplog):
    """The server goes away (connections refused and reset, as when it crashes) and comes back on the same
    port: everything logged meanwhile arrives in the same run, with one warning and one recovery message."""
    server = mlflow_server_outage
    sink = MLflowSink(tracking_uri=server.uri, experiment="outage", retry_interval_s=0.2)
    caplog.set_level(logging.INFO, logger="sparsity_callbacks.sinks.mlflow")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for step in range(5):
            sink.log_metrics({"loss/sparsity": float(step)}, step=step)
        assert sink.flush(timeout=60)
        run_id = sink.run_id

        server.stop()
        for step in range(5, 15):
            sink.log_metrics({"loss/sparsity": float(step)}, step=step)
            time.sleep(0.1)
        assert not sink.flush(timeout=0.5)
        assert len(_unreachable_warnings(records)) == 1

        server.start()  # same port, same store
        for step in range(15, 20):
            sink.log_metrics({"loss/sparsity": float(step)}, step=step)
        assert sink.flush(timeout=60)
        sink.close()
    assert len(_unreachable_warnings(records)) == 1
    assert "buffered" in str(_unreachable_warnings(records)[0].message)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    client = MlflowClient(server.uri)
    assert _history(client, run_id, "loss/sparsity") == [(s, float(s)) for s in range(20)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_server_that_never_comes_back_gives_a_fallback_file_that_replays(mlflow_server, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sink = MLflowSink(
        tracking_uri=dead, experiment="never-back", run_name="lost", retry_interval_s=0.5, fallback_dir=str(tmp_path)
    )
    mask = tmp_path / "mask.bin"
    mask.write_bytes(b"\x01\x02")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        sink.log_params({"sparsity.mode": "exact"})
        for step in range(10):  # the caller never waits: test_a_slow_server_never_slows_the_caller...
            sink.log_metrics(_metrics(step), step=step)
            time.sleep(0.05)
        assert sink.run_id is None  # its run could not be created: the server is down
        sink.set_tags({"sparsity.charts": "here"})
        sink.log_artifact(str(mask))
        sink.close(timeout=1.0)
    assert len(_unreachable_warnings(records)) == 1
    (fallback_warning,) = [w for w in records if "could not be delivered" in str(w.message)]
    (path,) = tmp_path.glob("sparsity_mlflow_fallback_*.jsonl")
    assert f"sparsity-callbacks replay {path}" in str(fallback_warning.message)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["type"] == "header" and rows[0]["run_id"] is None and rows[0]["experiment"] == "never-back"
    assert [row[3] for r in rows if r["type"] == "metrics" for row in r["metrics"]] == [
        s for s in range(10) for _ in _metrics(s)
    ]

    # the documented recovery: the command the warning prints, pointed at the server that is up now
    assert cli_main(["replay", str(path), "--tracking-uri", mlflow_server]) == 0
    run_id = capsys.readouterr().out.strip()
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "never-back"
    assert run.info.run_name == "lost" and run.info.status == "FINISHED"
    assert run.data.params == {"sparsity.mode": "exact"}
    assert run.data.tags["sparsity.charts"] == "here"
    for key in _metrics(0):
        assert _history(client, run_id, key) == [(s, pytest.approx(_metrics(s)[key])) for s in range(10)]
    assert [a.path for a in client.list_artifacts(run_id, "sparsity")] == ["sparsity/mask.bin"]
    local = client.download_artifacts(run_id, "sparsity/mask.bin", str(tmp_path / "dl"))
    assert open(local, "rb").read() == b"\x01\x02"
    assert os.path.exists(str(path))


class _SlowProxy:
    """An HTTP proxy on 127.0.0.1 that holds every request ``delay`` seconds, then forwards it to ``target``:
    a tracking server that answers, slowly."""

    def __init__(self, target: str, delay: float) -> None:
        import http.server
        import threading
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                proxy.requests += 1
                time.sleep(delay)
                if not proxy.gate.is_set():  # held until the test opens the gate
                    proxy.held += 1
                    proxy.gate.wait()
                if proxy.broken:  # like a reverse proxy whose tracking server died
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    self.send_error(503, "tracking server down")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(target + self.path, data=body, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, payload, reply_headers = response.status, response.read(), response.headers
                except urllib.error.HTTPError as err:
                    status, payload, reply_headers = err.code, err.read(), err.headers
                self.send_response(status)
                for key, value in reply_headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.requests = 0
        self.held = 0
        self.broken = False
        self.gate = threading.Event()
        self.gate.set()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_server_never_slows_the_caller_and_gets_everything(mlflow_server, tmp_path):
    """Every request to the tracking server takes 0.2 s (10x the caller's logging interval), and while the
    caller logs the server answers none: `log_metrics` still returns (it only appends to the buffer),
    batching keeps the number of requests far below the number of calls, and everything arrives by `close`."""
    proxy = _SlowProxy(mlflow_server, delay=0.2)
    try:
        sink = MLflowSink(tracking_uri=proxy.uri, experiment="slow-server", run_name="slow", fallback_dir=str(tmp_path))
        sink.log_params({"sparsity.mode": "exact"})
        proxy.gate.clear()  # from now on the server answers nothing until the loop is done
        safety = threading.Timer(60.0, proxy.gate.set)  # a caller that waited would finish only after this
        safety.start()
        for step in range(40):
            sink.log_metrics(_metrics(step), step=step)
            time.sleep(0.02)
        # every call returned while the server held a request unanswered: the caller never waits for it
        assert proxy.held > 0 and not proxy.gate.is_set()
        proxy.gate.set()
        safety.cancel()
        sink.close(timeout=120)
        run_id = sink.run_id
        assert proxy.requests < 40  # batched: fewer requests than log calls
    finally:
        proxy.close()
    client = MlflowClient(mlflow_server)
    for key in _metrics(0):
        assert _history(client, run_id, key) == [(s, pytest.approx(_metrics(s)[key])) for s in range(40)]
    assert client.get_run(run_id).data.params == {"sparsity.mode": "exact"}


def test_an_outage_in_the_middle_of_requests_warns_once_and_says_when_it_recovered(mlflow_server, caplog):
    """The server fails requests (503) after the run started: MLflow's HTTP client would retry each one
    internally for minutes (7 retries, exponential backoff) without anyone noticing; the worker's
    requests are tried once, so the outage warning comes at once and the recovery is logged."""
    proxy = _SlowProxy(mlflow_server, delay=0.0)
    caplog.set_level(logging.INFO, logger="sparsity_callbacks.sinks.mlflow")
    try:
        sink = MLflowSink(tracking_uri=proxy.uri, experiment="outage-in-flight", retry_interval_s=0.2)
        sink.log_metrics({"loss/sparsity": 0.0}, step=0)
        assert sink.flush(timeout=60)
        run_id = sink.run_id
        proxy.broken = True
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            deadline = time.monotonic() + 10.0  # MLflow's own retries would hide the outage for minutes
            step = 1
            while not _unreachable_warnings(records) and time.monotonic() < deadline:
                sink.log_metrics({"loss/sparsity": float(step)}, step=step)
                step += 1
                time.sleep(0.1)
            assert len(_unreachable_warnings(records)) == 1
            proxy.broken = False
            assert sink.flush(timeout=60)
            sink.close()
        assert len(_unreachable_warnings(records)) == 1
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        client = MlflowClient(mlflow_server)
        assert _history(client, run_id, "loss/sparsity") == [(s, float(s)) for s in range(step)]
    finally:
        proxy.close()


def test_close_stops_waiting_at_its_timeout_while_a_request_never_answers(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (a hung host): `close(timeout=1)` returns while
    the worker is still inside its request (here a probe allowed 600 s), and writes everything to the
    fallback file: it waits for its own deadline, not for the request."""
    import sparsity_callbacks.sinks.mlflow as sink_module

    probing = threading.Event()
    probe = sink_module._probe

    def recorded_probe(uri: str, timeout: float) -> bool:
        probing.set()
        return probe(uri, timeout)

    monkeypatch.setattr(sink_module, "_PROBE_TIMEOUT_S", 600.0)
    monkeypatch.setattr(sink_module, "_probe", recorded_probe)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # connections complete in the kernel backlog; nobody ever reads or answers
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        sink = MLflowSink(tracking_uri=uri, experiment="hung", retry_interval_s=0.2, fallback_dir=str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(3):
                sink.log_metrics(_metrics(step), step=step)
            assert probing.wait(60)  # the worker is inside its first request
            sink.close(timeout=1.0)
        assert sink._worker.is_alive() and sink._failed_attempts == 0  # still waiting for its first answer
    # closing the listening socket resets the connection: the worker's probe fails and the worker stops
    sink._worker.join(60)
    assert not sink._worker.is_alive()
    (fallback,) = tmp_path.glob("sparsity_mlflow_fallback_*.jsonl")
    records = [json.loads(line) for line in fallback.read_text().splitlines()]
    steps = {row[3] for r in records if r["type"] == "metrics" for row in r["metrics"]}
    assert steps == {0, 1, 2}  # (key, value, timestamp, step) rows of every logged step


def test_close_gives_up_after_one_failed_attempt_when_the_server_is_down(tmp_path):
    """Nothing listens: `close(timeout=30)` makes one more delivery attempt and, when it fails, writes the
    fallback file instead of retrying until the timeout (every 5 s: 6 attempts)."""
    sink = MLflowSink(
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        experiment="down",
        retry_interval_s=5.0,
        fallback_dir=str(tmp_path),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink.log_metrics(_metrics(0), step=0)
        with sink._cond:  # the first attempt (creating the run) has failed; the worker waits to retry
            assert sink._cond.wait_for(lambda: sink._failed_attempts == 1, 60)
        sink.close(timeout=30.0)
    assert sink._failed_attempts == 2 and not sink._worker.is_alive()
    assert len(list(tmp_path.glob("sparsity_mlflow_fallback_*.jsonl"))) == 1


def test_charts_location_for_each_kind_of_tracking_uri(tmp_path, monkeypatch):
    from sparsity_callbacks.sinks.mlflow import _charts_location

    monkeypatch.chdir(tmp_path)
    page = "#/experiments/7/runs/abc/model-metrics"
    tag, message = _charts_location("http://host:5000/", "7", "abc")
    assert tag == f"http://host:5000/{page}" and tag in message
    tag, message = _charts_location("sqlite:///mlflow.db", "7", "abc")  # relative: made absolute
    command = f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    assert tag == f"{command}  # then open http://127.0.0.1:5000/{page}" and command in message
    tag, _ = _charts_location("file:///data/mlruns", "7", "abc")
    assert tag.startswith("mlflow ui --backend-store-uri /data/mlruns  #")
    tag, _ = _charts_location("mlruns", None, "abc")  # no experiment known: the run's own address
    assert tag == f"mlflow ui --backend-store-uri {tmp_path / 'mlruns'}  # then open http://127.0.0.1:5000/#/runs/abc"
    tag, message = _charts_location("databricks", "7", "abc")
    assert tag == "run abc at databricks, tab Model metrics" and "sparsity/changed_fraction_by_layer" in message


def test_a_half_created_sqlite_store_is_called_broken_not_unreachable(tmp_path):
    """A process killed while MLflow created its sqlite tables leaves a store that fails every request: the
    warning names the store and the error and says what to do, instead of calling it "unreachable"."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:  # one table of many, as a killed table creation leaves it
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name VARCHAR(256))")
    sink = MLflowSink(tracking_uri=f"sqlite:///{db}", retry_interval_s=0.2, fallback_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        sink.log_metrics(_metrics(0), step=0)
        deadline = time.monotonic() + 60
        while not [w for w in records if issubclass(w.category, MLflowSinkWarning)] and time.monotonic() < deadline:
            time.sleep(0.2)
            sink.log_metrics(_metrics(1), step=1)
        sink.close(timeout=2.0)
    messages = [str(w.message) for w in records if issubclass(w.category, MLflowSinkWarning)]
    (broken,) = [m for m in messages if "buffered" in m]
    assert f"tracking store at sqlite:///{db} fails" in broken and "half-created" in broken
    assert "unreachable" not in broken


def test_deferred_metrics_are_built_on_the_worker_and_warned_about_on_the_caller(mlflow_local):
    """`log_metrics(function, step)`: the caller only queues; the worker thread builds the dict, renames keys,
    skips non-numeric values and splits what is over MLflow's 1000 per request. The warnings come on the
    caller's thread at its next call (here `close`), and every value arrives at its step and timestamp."""
    import threading

    built_on: list[str] = []
    built = threading.Event()  # held until the caller has logged both: the worker cannot have built one before

    def build(step: int):
        def metrics() -> dict[str, object]:
            assert built.wait(60)
            built_on.append(threading.current_thread().name)
            values: dict[str, object] = {f"m/{i}": float(i + step) for i in range(1500)}
            values.update({"sparsity//weird key?": 0.5, "bad": "x"})
            return values

        return metrics

    sink = MLflowSink(experiment="deferred")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        before = int(time.time() * 1000)
        sink.log_metrics(build(3), step=3)
        sink.log_metrics(build(4), step=4)
        assert [str(w.message) for w in records if "MLflowSink" in str(w.message)] == []  # nothing built yet here
        built.set()
        sink.close(timeout=120)
    messages = [str(w.message) for w in records]
    assert built_on == ["MLflowSink-worker"] * 2
    assert sum("'sparsity//weird key?' -> 'sparsity/weird key_'" in m for m in messages) == 1
    assert sum("'bad' has a non-numeric value 'x'" in m for m in messages) == 1
    client = MlflowClient()
    assert _history(client, sink.run_id, "m/1499") == [(3, 1502.0), (4, 1503.0)]
    assert _history(client, sink.run_id, "sparsity/weird key_") == [(3, 0.5), (4, 0.5)]
    assert len(client.get_run(sink.run_id).data.metrics) == 1501
    stamps = {m.timestamp for m in client.get_metric_history(sink.run_id, "m/0")}
    assert all(before <= t <= before + 60_000 for t in stamps)


def test_deferred_metrics_that_cannot_be_delivered_reach_the_fallback_file(mlflow_local, tmp_path):
    """Refused deferred metrics are built for the fallback file; a metrics function that raises loses its own
    metrics with a warning, never the sink or the metrics queued after it."""
    sink = MLflowSink(run_id="0123456789abcdef0123456789abcdef", fallback_dir=str(tmp_path / "fb"))

    def broken() -> dict[str, float]:
        raise RuntimeError("no figures")

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        sink.log_metrics(lambda: _metrics(10), step=10)
        sink.log_metrics(broken, step=11)
        sink.log_metrics(lambda: _metrics(20), step=20)
        sink.close(timeout=30)
    assert any(
        "metrics of step 11 could not be built" in str(w.message) and "no figures" in str(w.message) for w in records
    )
    (path,) = (tmp_path / "fb").glob("sparsity_mlflow_fallback_*.jsonl")
    rows = [
        row for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "metrics" for row in r["metrics"]
    ]
    assert sorted((k, v, s) for k, v, _, s in rows) == sorted(
        (k, v, s) for s in (10, 20) for k, v in _metrics(s).items()
    )
