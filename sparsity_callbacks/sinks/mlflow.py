"""`MLflowSink`: asynchronous, batched, outage-proof MLflow logging into one run.

The engine's only MLflow writer; the HF and Lightning adapters both use it. A training step never waits
for the server: `log_metrics` appends to an in-memory buffer and a daemon worker thread delivers it with
`MlflowClient.log_batch` (at most 1000 metrics / 100 params per request, MLflow's limits).

Outage handling: when the tracking server cannot be reached the data stays buffered, the worker retries
every ``retry_interval_s`` with a bounded exponential backoff (at most ``10 * retry_interval_s``), ONE
warning says so (emitted on the caller's thread at its next call) and one info line says when delivery
recovered; buffered metrics are re-sent in their original order with their original timestamps and steps.
If the server never comes back, `close` writes everything undelivered to a JSON-lines fallback file and
warns with the command that replays it (``sparsity-callbacks replay FILE``, which calls `_replay_fallback`).

Memory: the buffer holds only what has not been delivered yet (about 150 bytes per metric value), so it is
bounded by what was measured during the outage: e.g. 100 metric keys every 10 steps for 10 000 steps of
outage is 100 000 values, about 15 MB. Nothing is dropped to bound it.

How the worker avoids MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` defaults to 7 with a
backoff of minutes and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` to 120 s, both read from ``os.environ`` at every
request, so changing them would also change the training thread's and other callbacks' requests):
for ``http(s)`` tracking URIs the worker first probes ``<uri>/health`` with one short-timeout request of
its own, and talks to MLflow only when the server answers. Its MLflow requests themselves are tried once
with a ``_REQUEST_TIMEOUT_S`` timeout: MLflow's ``http_request`` is wrapped once per process so that a
call made on a sink worker thread (a thread-local flag) that does not choose ``max_retries`` / ``timeout``
itself gets 0 retries and that timeout; calls on every other thread pass through unchanged. So a server
that dies while a request is in flight is seen at once (the "unreachable" warning), and the worker's own
backoff retries it (the "reachable again" line). `close` never waits longer than its ``timeout``.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger(__name__)

#: MLflow's limits per ``log_batch`` request (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_KEY_LENGTH = 250
_MAX_PARAM_VALUE_LENGTH = 6000
#: seconds the worker waits for the ``/health`` probe before calling the server unreachable.
_PROBE_TIMEOUT_S = 3.0
#: seconds one MLflow request of the worker may take (connect or read), tried once (see the module docstring).
_REQUEST_TIMEOUT_S = 30.0
#: seconds `close` waits for a request that is still in flight after its timeout (within its deadline).
_JOIN_GRACE_S = 2.0
_FALLBACK_VERSION = 1
#: the record types of a fallback file after its header (what `_write_fallback` writes, `_replay_fallback` reads).
_RECORD_TYPES = ("metrics", "params", "tags", "artifact", "terminate")
#: HTTP statuses that mean "try again later" rather than "this request is wrong".
_TRANSIENT_STATUSES = frozenset({408, 429})
#: statuses of a proxy or gateway whose tracking server behind it does not answer.
_GATEWAY = frozenset({502, 503, 504})


class MLflowSinkWarning(UserWarning):
    """Warnings of `MLflowSink`: server unreachable, renamed keys, refused data, fallback file written."""


class _Unreachable(Exception):
    """The tracking server did not answer the worker's probe."""


@dataclass
class _Entry:
    """One queued unit of work. ``kind``: ``metrics`` (list of ``(key, value, timestamp_ms, step)``, or a
    `_DeferredMetrics` until the worker builds that list), ``params`` (dict), ``artifact``
    (``(local path, artifact path)``) or ``terminate`` (status)."""

    seq: int
    kind: str
    payload: Any


@dataclass(frozen=True)
class _DeferredMetrics:
    """Metrics queued as the function that builds them, called on the worker thread (`MLflowSink._rows`)."""

    build: Callable[[], Mapping[str, Any]]
    timestamp: int
    step: int


def _require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError as err:  # pragma: no cover - mlflow is installed in the test environment
        raise ImportError(
            "MLflow logging needs the `mlflow` package. HINT: pip install 'sparsity-callbacks[mlflow]', "
            "or pass log_to_mlflow=False."
        ) from err


_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]" if os.name != "nt" else r"[^A-Za-z0-9_\-. /]")


def _sanitise_key(key: str) -> str:
    """``key`` made acceptable to MLflow: only alphanumerics and ``_ - . space / :`` (no colon on
    Windows), no empty, ``.`` or ``..`` path segments, no leading ``..`` and at most 250 characters."""
    new = _BAD_KEY_CHARS.sub("_", str(key))
    segments = [s if s not in (".", "..") else "_" * len(s) for s in new.split("/") if s]
    new = "/".join(segments) or "_"
    if new.startswith(".."):
        new = "_" + new[1:]
    return new[:_MAX_KEY_LENGTH].rstrip("/")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _http_status(err: BaseException) -> int | None:
    """The HTTP status an MLflow or requests error stands for, if any."""
    get_status = getattr(err, "get_http_status_code", None)
    if callable(get_status):
        try:
            return int(get_status())
        except Exception:
            return None
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_refusal(err: BaseException) -> bool:
    """True when the server understood and refused the request (4xx other than 408/429): retrying the
    same request cannot succeed. Everything else (connection errors, timeouts, 5xx) is an outage."""
    if isinstance(err, _Unreachable):
        return False
    status = _http_status(err)
    return status is not None and 400 <= status < 500 and status not in _TRANSIENT_STATUSES


def _is_connection_error(err: BaseException | None) -> bool:
    """True for errors that mean "no answer" (refused, reset, timed out), also when MLflow wrapped them."""
    import requests

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
            return True
        if any(word in str(err) for word in ("Max retries exceeded", "Connection refused", "timed out")):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _describe(err: BaseException | None) -> str:
    """``Type: first 300 characters of the message`` on one line."""
    if err is None:
        return "no error recorded"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _probe(uri: str, timeout: float) -> bool:
    """True when an ``http(s)`` tracking server answers at all (any HTTP status), within ``timeout`` s."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.exceptions.SSLError:
        return True  # it answered; MLflow's own request decides with the configured certificates
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        return False
    except requests.exceptions.RequestException:
        return True
    return True


def _require_reachable(uri: str | None = None) -> None:
    """Raise `ConnectionError` at once when the ``http(s)`` tracking server ``uri`` (default: MLflow's
    current tracking URI) does not answer its ``/health`` probe within `_PROBE_TIMEOUT_S` -- instead of
    MLflow's own retries (minutes) ending in an error that blames the run or its files."""
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if _is_http(uri) and not _probe(uri, _PROBE_TIMEOUT_S):
        raise ConnectionError(
            f"The MLflow tracking server at {uri} is unreachable (no answer from {uri.rstrip('/')}/health within "
            f"{_PROBE_TIMEOUT_S:g} s). HINT: start the server, or point --tracking-uri / MLFLOW_TRACKING_URI at one "
            "that runs."
        )


_on_worker = threading.local()  # `.active` is True on sink worker threads
#: modules whose ``http_request`` the worker's MLflow calls go through (tracking REST calls, proxied artifacts).
_REQUEST_MODULES = (
    "mlflow.utils.rest_utils",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.artifact.http_artifact_repo",
)


def _limit_worker_requests() -> None:
    """Wrap MLflow's ``http_request`` (once per process) so that, on a sink worker thread only, a request
    is tried once with a `_REQUEST_TIMEOUT_S` timeout unless the caller chose otherwise. Other threads
    are unaffected; nothing global (environment variables, MLflow settings) is changed."""
    import importlib

    for name in _REQUEST_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(module, "http_request", None)
        if original is None or getattr(original, "_sparsity_limited", False):
            continue

        @functools.wraps(original)
        def http_request(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if getattr(_on_worker, "active", False) and len(args) <= 3:  # (host_creds, endpoint, method)
                if kwargs.get("max_retries") is None:
                    kwargs["max_retries"] = 0
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = _REQUEST_TIMEOUT_S
            return _original(*args, **kwargs)

        http_request._sparsity_limited = True  # type: ignore[attr-defined]
        module.http_request = http_request  # type: ignore[attr-defined]


def _close_at_exit(ref: weakref.ReferenceType[MLflowSink]) -> None:
    sink = ref()
    if sink is not None:
        sink.close()


class MLflowSink:
    """Logs metrics, params and artifacts into one MLflow run, asynchronously and in batches.

    The run is resolved once, lazily, on the caller's thread at the first use (so fluent MLflow state such
    as HF's ``MLflowCallback`` run is visible):

    1. ``run_id`` given: that run, under ``tracking_uri`` (else ``mlflow.get_tracking_uri()``);
    2. else ``mlflow.active_run()``, when ``tracking_uri`` is None or the current tracking URI: reused,
       never a second run for one training, and left open at `close`;
    3. else a new run created by the sink in ``experiment`` (created if missing; otherwise
       ``MLFLOW_EXPERIMENT_NAME``, the experiment of ``mlflow.set_experiment`` or the default one) under
       ``tracking_uri`` / ``MLFLOW_TRACKING_URI`` read at that moment / MLflow's default (a local sqlite
       ``mlflow.db``). The worker creates it (so an unreachable server does not block the caller) and
       `close` terminates it with status FINISHED.

    Writing uses only ``MlflowClient`` with the explicit run id, never the fluent API.

    Args:
        run_id: log into this existing run.
        tracking_uri: tracking URI of the run (see above).
        experiment: experiment name for a run the sink creates.
        run_name: name of a run the sink creates (MLflow picks one if None).
        enabled: False (e.g. on non-zero ranks) makes every method a no-op.
        retry_interval_s: seconds between delivery attempts while the server is unreachable (doubles
            after each failure, up to ``10 * retry_interval_s``).
        fallback_dir: folder for the JSON-lines file of undelivered data written by `close` (default: the
            current directory).
        finish_run: with ``run_id``: the run was created for this training by an earlier sink (a training
            resumed after a crash); `close` terminates it (FINISHED) as if the sink had created it.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        enabled: bool = True,
        retry_interval_s: float = 2.0,
        fallback_dir: str | None = None,
        finish_run: bool = False,
    ) -> None:
        for name, value in (
            ("run_id", run_id),
            ("tracking_uri", tracking_uri),
            ("experiment", experiment),
            ("run_name", run_name),
            ("fallback_dir", fallback_dir),
        ):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"`{name}` must be a string or None, got {value!r}.")
        if not isinstance(finish_run, bool) or (finish_run and run_id is None):
            raise ValueError(f"`finish_run` must be True (only with `run_id`) or False, got {finish_run!r}.")
        if not isinstance(enabled, bool):
            raise ValueError(f"`enabled` must be True or False, got {enabled!r}.")
        if (
            isinstance(retry_interval_s, bool)
            or not isinstance(retry_interval_s, (int, float))
            or not 0 < retry_interval_s < float("inf")
        ):
            raise ValueError(f"`retry_interval_s` must be a positive number of seconds, got {retry_interval_s!r}.")
        if enabled:
            _require_mlflow()
        self._enabled = enabled
        self._explicit_run_id = run_id
        self._finish_run = finish_run
        self._explicit_uri = tracking_uri
        self._experiment = experiment
        self._run_name = run_name
        self._retry_interval_s = float(retry_interval_s)
        self._max_backoff_s = 10.0 * self._retry_interval_s
        self._fallback_dir = fallback_dir

        self._cond = threading.Condition()
        self._pending: deque[_Entry] = deque()
        self._refused: list[_Entry] = []
        self._seq = itertools.count(1)
        self._last_seq = 0  # highest seq enqueued
        self._handled_seq = 0  # every entry with seq <= this was delivered or refused
        self._worker: threading.Thread | None = None
        self._client: Any = None  # the worker's MlflowClient
        self._stop = False
        self._closing = False
        self._closed = False
        self._wake = False
        self._failed_attempts = 0

        # run state (set by `_resolve` on the caller's thread; `_run_id` may be set later by the worker)
        self._resolved = False
        self._uri: str | None = None
        self._run_id: str | None = None
        self._owns_run = False
        self._experiment_id: str | None = None
        self._create_attempted = False
        self._create_refused = False

        # notices for the caller's thread
        self._outage = False
        self._outage_warned = False
        self._outage_since = 0.0
        self._outage_error: BaseException | None = None
        self._notes: list[str] = []  # warnings decided off the caller's thread, emitted on it (`_emit_notices`)
        self._refusal_seen: set[str] = set()
        self._renamed: dict[str, str] = {}
        self._key_cache: dict[str, str] = {}
        self._bad_values: set[str] = set()
        self._staging: str | None = None
        self._atexit_registered = False

    # --- public API ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def tracking_uri(self) -> str | None:
        """Tracking URI of the run (None until resolved or when disabled)."""
        return self._uri

    @property
    def owns_run(self) -> bool:
        """True when the sink created (or was told to finish) its run and terminates it at `close`."""
        return self._owns_run

    @property
    def run_id(self) -> str | None:
        """Id of the run the sink logs into; resolves it on first access. None when disabled, or while a
        run the sink has to create could not be created yet because the server is unreachable (waits for
        the worker's first attempt, at most 60 s)."""
        return self.wait_for_run_id(60.0)

    def wait_for_run_id(self, timeout: float) -> str | None:
        """`run_id`, waiting at most ``timeout`` s for a run the sink creates."""
        if not self._enabled:
            return None
        self._resolve()
        if self._run_id is None and self._owns_run:
            self._ensure_worker()
            with self._cond:
                self._cond.wait_for(lambda: self._run_id is not None or self._create_attempted or self._stop, timeout)
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue ``params`` (values converted with `str`, cut to MLflow's 6000 characters). Never blocks,
        never raises."""
        try:
            if not self._usable():
                return
            clean: dict[str, str] = {}
            for key, value in params.items():
                text = str(value)
                if len(text) > _MAX_PARAM_VALUE_LENGTH:
                    text = text[: _MAX_PARAM_VALUE_LENGTH - 3] + "..."
                clean[self._key(key)] = text
            self._notify_renamed()
            items = list(clean.items())
            for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
                self._enqueue("params", dict(items[i : i + _MAX_PARAMS_PER_BATCH]))
        except Exception as err:  # never kill training for logging
            _log.warning("MLflowSink.log_params failed and skipped these params: %r", err)

    def log_metrics(self, metrics: Mapping[str, float] | Callable[[], Mapping[str, float]], step: int) -> None:
        """Queue ``metrics`` at optimizer step ``step`` (timestamped now). Never blocks on the network and
        never raises: values that are not numbers are skipped with one warning per key.

        ``metrics`` may also be a function returning them (e.g. ``measurement.to_metrics``): the worker
        thread calls it, so the caller pays only the queue put. It must not depend on state that changes
        after this call. The warnings about its keys and values are then raised at the caller's next call
        to the sink (or at `close`)."""
        try:
            if not self._usable():
                return
            timestamp = int(time.time() * 1000)
            step = int(step)
            if callable(metrics):
                self._enqueue("metrics", _DeferredMetrics(metrics, timestamp, step))
                return
            rows = self._metric_rows(metrics, timestamp, step, notes=None)
            self._notify_renamed()
            for i in range(0, len(rows), _MAX_METRICS_PER_BATCH):
                self._enqueue("metrics", rows[i : i + _MAX_METRICS_PER_BATCH])
        except Exception as err:  # never kill training for logging
            _log.warning("MLflowSink.log_metrics failed and skipped these metrics: %r", err)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags (values converted with `str`). Never blocks, never raises."""
        try:
            if not self._usable():
                return
            clean = {self._key(key): str(value) for key, value in tags.items()}
            self._notify_renamed()
            if clean:
                self._enqueue("tags", clean)
        except Exception as err:  # never kill training for logging
            _log.warning("MLflowSink.set_tags failed and skipped these tags: %r", err)

    @property
    def experiment_id(self) -> str | None:
        """Experiment of the run (None when unknown, e.g. an explicit ``run_id`` whose run was not read)."""
        return self._experiment_id

    def log_artifact(self, local_path: str, artifact_path: str = "sparsity") -> None:
        """Queue the file ``local_path`` for upload under ``artifact_path`` of the run. A hard link (or a
        copy) is taken now, so the file may be deleted or rewritten right after this call. Never raises:
        a missing file gives a warning."""
        if not self._usable():
            return
        if not os.path.isfile(local_path):
            warnings.warn(
                f"MLflowSink.log_artifact: {local_path!r} is not a file; nothing is uploaded.",
                MLflowSinkWarning,
                stacklevel=2,
            )
            return
        try:
            staged = self._stage(local_path)
        except OSError as err:
            warnings.warn(
                f"MLflowSink.log_artifact: cannot read {local_path!r} ({err}); nothing is uploaded.",
                MLflowSinkWarning,
                stacklevel=2,
            )
            return
        self._enqueue("artifact", (staged, artifact_path))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s (None: forever) for everything queued so far to be handled. True when
        all of it was delivered (False on timeout, or when the server refused some of it)."""
        if not self._enabled:
            return True
        with self._cond:
            target = self._last_seq
            self._cond.wait_for(lambda: self._handled_seq >= target or self._stop, timeout)
            done = self._handled_seq >= target and not self._refused
        self._emit_notices()
        return done

    def close(self, timeout: float = 10.0) -> None:
        """Flush, terminate a run the sink created (FINISHED), stop the worker; return within about
        ``timeout`` s whatever the server does (plus the time to write the fallback file). While the
        server is unreachable the wait ends as soon as one more delivery attempt has failed. Whatever
        could not be delivered is written to the fallback file, with a warning that says how to replay
        it. Idempotent; later log calls are ignored."""
        if not self._enabled or self._closed:
            return
        deadline = time.monotonic() + timeout
        self._closed = True
        if self._resolved and self._owns_run:
            self._enqueue("terminate", "FINISHED", force=True)
        delivered = True
        with self._cond:
            self._closing = True
            self._wake = True
            self._cond.notify_all()
            if self._worker is not None:
                target, failures = self._last_seq, self._failed_attempts
                self._cond.wait_for(
                    lambda: self._handled_seq >= target or self._stop or self._failed_attempts > failures,
                    max(0.0, deadline - time.monotonic()),
                )
                delivered = self._handled_seq >= target and not self._refused
            self._stop = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(max(0.0, min(_JOIN_GRACE_S, deadline - time.monotonic())))
        with self._cond:
            leftover = sorted([*self._pending, *self._refused], key=lambda e: e.seq)
        if leftover and (not delivered or self._refused):
            path = self._write_fallback(leftover)
            n_metrics = sum(len(self._rows(e)) for e in leftover if e.kind == "metrics")
            warnings.warn(
                f"MLflowSink: {n_metrics} metric values and {len(leftover)} queued items could not be delivered "
                f"to MLflow at {self._uri} (run {self._run_id}); they were written to {path}. Replay them once "
                "the server is back (or elsewhere: add --tracking-uri URI / --run-id ID) with:\n  "
                f"sparsity-callbacks replay {shlex.quote(path)}",
                MLflowSinkWarning,
                stacklevel=2,
            )
        self._emit_notices()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    # --- caller-side internals -------------------------------------------------------------------
    def _usable(self) -> bool:
        if not self._enabled:
            return False
        if self._closed:
            _log.debug("MLflowSink is closed; call ignored.")
            return False
        self._resolve()
        self._emit_notices()
        return True

    def _resolve(self) -> None:
        """Pick the run (see the class docstring), once, on the caller's thread."""
        if self._resolved:
            return
        import mlflow

        current_uri = mlflow.get_tracking_uri()
        self._uri = self._explicit_uri or current_uri
        if self._explicit_run_id is not None:
            self._run_id = self._explicit_run_id
            self._owns_run = self._finish_run
        else:
            active = mlflow.active_run()
            if active is not None and (self._explicit_uri is None or self._explicit_uri == current_uri):
                self._run_id = active.info.run_id
                self._experiment_id = active.info.experiment_id
            else:
                self._owns_run = True
                if self._experiment is None and os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                    self._experiment = os.environ["MLFLOW_EXPERIMENT_NAME"]
                if self._experiment is None and self._uri == current_uri:
                    from mlflow.tracking import fluent

                    self._experiment_id = getattr(fluent, "_active_experiment_id", None)
                if self._experiment is None and self._experiment_id is None:
                    self._experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"
        self._resolved = True
        if not self._atexit_registered:
            atexit.register(_close_at_exit, weakref.ref(self))
            self._atexit_registered = True

    def _key(self, key: str) -> str:
        cached = self._key_cache.get(key)
        if cached is None:
            cached = _sanitise_key(key)
            if cached != key:
                with self._cond:  # the worker renames the keys of deferred metrics
                    self._renamed[key] = cached
            self._key_cache[key] = cached
        return cached

    def _metric_rows(
        self, metrics: Mapping[str, Any], timestamp: int, step: int, notes: list[str] | None
    ) -> list[tuple[str, float, int, int]]:
        """``(MLflow key, value, timestamp_ms, step)`` rows of ``metrics``; a non-numeric value is skipped
        with one warning per key: raised now, or appended to ``notes`` (off the caller's thread)."""
        rows = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                if key not in self._bad_values:
                    self._bad_values.add(key)
                    message = f"MLflowSink: metric {key!r} has a non-numeric value {value!r}; it is not logged."
                    if notes is None:
                        warnings.warn(message, MLflowSinkWarning, stacklevel=3)
                    else:
                        notes.append(message)
                continue
            rows.append((self._key(key), number, timestamp, step))
        return rows

    def _rows(self, entry: _Entry) -> list[tuple[str, float, int, int]]:
        """The rows of a ``metrics`` entry, building deferred ones (any thread: the result is the same)."""
        payload = entry.payload
        if not isinstance(payload, _DeferredMetrics):
            return payload
        notes: list[str] = []
        try:
            rows = self._metric_rows(payload.build(), payload.timestamp, payload.step, notes=notes)
        except Exception as err:  # a broken metrics function loses its metrics, never the sink
            rows = []
            notes.append(
                f"MLflowSink: the metrics of step {payload.step} could not be built and are not logged: "
                f"{_describe(err)}"
            )
        entry.payload = rows
        if notes:
            with self._cond:
                self._notes.extend(notes)
        return rows

    def _build_deferred(self) -> None:
        """Build the deferred metrics queued so far (worker thread, outside the lock)."""
        with self._cond:
            deferred = [e for e in self._pending if isinstance(e.payload, _DeferredMetrics)]
        for entry in deferred:
            self._rows(entry)

    def _notify_renamed(self) -> None:
        with self._cond:
            renamed, self._renamed = self._renamed, {}
        if renamed:
            listing = ", ".join(f"{k!r} -> {v!r}" for k, v in renamed.items())
            warnings.warn(
                f"MLflowSink: keys renamed to what MLflow accepts (alphanumerics and _ - . space / :): {listing}",
                MLflowSinkWarning,
                stacklevel=3,
            )

    def _emit_notices(self) -> None:
        """Warnings decided by the worker, raised on the caller's thread (one per outage)."""
        with self._cond:
            outage = self._outage and not self._outage_warned
            if outage:
                self._outage_warned = True
            notes, self._notes = self._notes, []
            pending = list(self._pending) if outage else []
        self._notify_renamed()
        if outage:
            n_buffered = sum(len(self._rows(e)) for e in pending if e.kind == "metrics")
            warnings.warn(
                f"MLflowSink: {self._outage_cause()}; metrics are buffered "
                f"in memory ({n_buffered} values so far) and retried every {self._retry_interval_s:g} s or more. "
                "Training continues; nothing is lost (undelivered data is written to a fallback file at close).",
                MLflowSinkWarning,
                stacklevel=3,
            )
        for note in notes:
            warnings.warn(note, MLflowSinkWarning, stacklevel=3)

    def _outage_cause(self) -> str:
        """What the outage is: a server that does not answer, a server that answers with errors, or a local
        store (sqlite, file) that fails -- e.g. a database whose tables were half-created by a process killed
        while MLflow created them, which no retry repairs."""
        err = self._outage_error
        if _is_http(self._uri or ""):
            if (
                err is None
                or isinstance(err, _Unreachable)
                or _is_connection_error(err)
                or _http_status(err) in _GATEWAY
            ):
                return f"the MLflow tracking server at {self._uri} is unreachable"
            return f"the MLflow tracking server at {self._uri} answers but fails requests ({_describe(err)})"
        return (
            f"the MLflow tracking store at {self._uri} fails ({_describe(err)}). HINT: a store that a killed process "
            "left half-created stays broken: move it away (MLflow creates a new one) or set mlflow_tracking_uri / "
            "MLFLOW_TRACKING_URI to another store, then replay the fallback file"
        )

    def _stage(self, local_path: str) -> str:
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="sparsity_mlflow_staging_")
        folder = tempfile.mkdtemp(dir=self._staging)
        staged = os.path.join(folder, os.path.basename(local_path))
        try:
            os.link(local_path, staged)
        except OSError:
            shutil.copy2(local_path, staged)
        return staged

    def _enqueue(self, kind: str, payload: Any, force: bool = False) -> None:
        if self._closed and not force:
            return
        with self._cond:
            seq = next(self._seq)
            self._last_seq = seq
            self._pending.append(_Entry(seq, kind, payload))
            self._cond.notify_all()
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._worker is None:
            with self._cond:
                if self._worker is None:
                    _limit_worker_requests()
                    self._worker = threading.Thread(target=self._work, name="MLflowSink-worker", daemon=True)
                    self._worker.start()

    # --- worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        _on_worker.active = True
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._pending or self._must_create())
                if self._stop:
                    return
            try:
                self._attempt()
            except Exception as err:  # an outage: keep everything, retry later
                failures += 1
                self._on_outage(err)
                with self._cond:
                    self._create_attempted = True  # `run_id` stops waiting for the run
                    self._failed_attempts += 1  # `close` stops waiting after a failure
                    self._cond.notify_all()
                delay = (
                    self._retry_interval_s
                    if self._closing
                    else min(self._retry_interval_s * 2 ** (failures - 1), self._max_backoff_s)
                )
                with self._cond:
                    self._wake = False
                    self._cond.wait_for(lambda: self._stop or self._wake, delay)
            else:
                failures = 0

    def _must_create(self) -> bool:
        return self._owns_run and self._run_id is None and not self._create_refused

    def _attempt(self) -> None:
        """Deliver the run creation or the next batch; raise on an outage (nothing is removed then)."""
        self._build_deferred()
        uri = self._uri or ""  # resolved before the worker runs
        if _is_http(uri) and not _probe(uri, _PROBE_TIMEOUT_S):
            raise _Unreachable(f"no answer from {self._uri}/health within {_PROBE_TIMEOUT_S:g} s")
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self._uri)
        client = self._client
        if self._run_id is None:
            if self._create_refused:
                self._on_refused(self._next_batch(), None)
                return
            try:
                self._create_run(client)
            except Exception as err:
                if not _is_refusal(err):
                    raise
                with self._cond:
                    self._create_refused = True
                    self._create_attempted = True
                self._on_refused(self._next_batch(), err)
                return
            self._on_success()
            return
        batch = self._next_batch()
        if not batch:
            return
        try:
            self._send(client, batch)
        except Exception as err:
            if not _is_refusal(err):
                raise
            self._on_refused(batch, err)
            return
        with self._cond:
            for _ in batch:
                self._pending.popleft()
            self._handled_seq = max(self._handled_seq, batch[-1].seq)
            self._cond.notify_all()
        for entry in batch:
            if entry.kind == "artifact":
                shutil.rmtree(os.path.dirname(entry.payload[0]), ignore_errors=True)
        self._on_success()

    def _create_run(self, client: Any) -> None:
        experiment_id = self._experiment_id
        if self._experiment is not None:
            experiment_id = _get_or_create_experiment(client, self._experiment)
            self._experiment_id = experiment_id
        run = client.create_run(experiment_id, run_name=self._run_name)
        with self._cond:
            self._run_id = run.info.run_id
            self._create_attempted = True
            self._cond.notify_all()
        _log.info("MLflowSink: created run %s in experiment %s at %s.", run.info.run_id, experiment_id, self._uri)

    def _next_batch(self) -> list[_Entry]:
        """The head entry, merged with the following metric entries up to 1000 metric values."""
        with self._cond:
            if not self._pending:
                return []
            head = self._pending[0]
            batch = [head]
            if head.kind == "metrics":
                total = len(self._rows(head))
                for entry in itertools.islice(self._pending, 1, None):
                    if entry.kind != "metrics" or isinstance(entry.payload, _DeferredMetrics):
                        break  # a deferred entry (queued just now) goes with the next batch
                    if total + len(entry.payload) > _MAX_METRICS_PER_BATCH:
                        break
                    batch.append(entry)
                    total += len(entry.payload)
            return batch

    def _send(self, client: Any, batch: list[_Entry]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        head = batch[0]
        if head.kind == "metrics":
            metrics = [Metric(k, v, t, s) for entry in batch for (k, v, t, s) in entry.payload]
            for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):  # one deferred entry may hold more
                client.log_batch(self._run_id, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])
        elif head.kind == "params":
            client.log_batch(self._run_id, params=[Param(k, v) for k, v in head.payload.items()])
        elif head.kind == "tags":
            client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in head.payload.items()])
        elif head.kind == "artifact":
            local_path, artifact_path = head.payload
            client.log_artifact(self._run_id, local_path, artifact_path)
        elif head.kind == "terminate":
            client.set_terminated(self._run_id, head.payload)

    def _on_success(self) -> None:
        with self._cond:
            was_out, self._outage = self._outage, False
            self._outage_warned = False
            since = self._outage_since
        if was_out:
            _log.info(
                "MLflowSink: MLflow at %s is reachable again after %.0f s; buffered data is being delivered.",
                self._uri,
                time.monotonic() - since,
            )

    def _on_outage(self, err: BaseException) -> None:
        with self._cond:
            if not self._outage:
                self._outage_error = err
                self._outage = True
                self._outage_since = time.monotonic()
                _log.debug("MLflowSink: delivery failed, will retry: %r", err)

    def _on_refused(self, batch: list[_Entry], err: BaseException | None) -> None:
        """The server refused ``batch`` (a 4xx; ``err`` None: the run could not be created): keep it for
        the fallback file and go on with the rest. One warning per distinct error message."""
        with self._cond:
            for _ in batch:
                self._refused.append(self._pending.popleft())
            if batch:
                self._handled_seq = max(self._handled_seq, batch[-1].seq)
            if err is not None:
                what = batch[0].kind if batch else "the run creation"
                message = str(err)[:500]
                if message not in self._refusal_seen:
                    self._refusal_seen.add(message)
                    self._notes.append(
                        f"MLflowSink: MLflow at {self._uri} refused {what} (run {self._run_id}): {message} "
                        "-- this and any further refused data is kept and written to the fallback file at close."
                    )
            self._cond.notify_all()

    # --- fallback --------------------------------------------------------------------------------
    def _write_fallback(self, entries: list[_Entry]) -> str:
        folder = self._fallback_dir or os.getcwd()
        os.makedirs(folder, exist_ok=True)
        tag = self._run_id or time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(folder, f"sparsity_mlflow_fallback_{tag}.jsonl")
        if os.path.exists(path):
            path = os.path.join(folder, f"sparsity_mlflow_fallback_{tag}_{os.getpid()}_{int(time.time())}.jsonl")
        artifact_dir = os.path.splitext(path)[0] + "_artifacts"
        header = {
            "type": "header",
            "version": _FALLBACK_VERSION,
            "tracking_uri": self._uri,
            "run_id": self._run_id,
            "owns_run": self._owns_run,
            "experiment": self._experiment,
            "experiment_id": self._experiment_id,
            "run_name": self._run_name,
        }
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            for entry in entries:
                if entry.kind == "metrics":
                    record = {"type": "metrics", "metrics": [list(row) for row in self._rows(entry)]}
                elif entry.kind == "params":
                    record = {"type": "params", "params": entry.payload}
                elif entry.kind == "tags":
                    record = {"type": "tags", "tags": entry.payload}
                elif entry.kind == "artifact":
                    staged, artifact_path = entry.payload
                    os.makedirs(artifact_dir, exist_ok=True)
                    kept = os.path.join(artifact_dir, f"{entry.seq}_{os.path.basename(staged)}")
                    shutil.move(staged, kept)
                    record = {
                        "type": "artifact",
                        "path": kept,
                        "name": os.path.basename(staged),
                        "artifact_path": artifact_path,
                    }
                else:
                    record = {"type": "terminate", "status": entry.payload}
                f.write(json.dumps(record) + "\n")
        return path


#: the chart groups MLflow's run page shows for our keys (it groups by the key up to its last ``/``).
CHART_GROUPS = ("sparsity", "sparsity/changed_fraction_by_layer", "sparsity/changed_fraction_by_module")


def _charts_location(tracking_uri: str | None, experiment_id: str | None, run_id: str) -> tuple[str, str]:
    """Where a user finds the run's sparsity charts: ``(tag value, message to print)``.

    An http(s) tracking server: the direct URL of the run's "Model metrics" tab. A local store (sqlite,
    file): the ``mlflow ui`` command for it (absolute path, so it works from any folder) and the URL to
    open once it runs. Anything else (e.g. ``databricks``): the run id and the tab to click.
    """
    groups = ", ".join(f'"{g}"' for g in CHART_GROUPS)
    page = f"#/experiments/{experiment_id}/runs/{run_id}/model-metrics" if experiment_id else f"#/runs/{run_id}"
    uri = tracking_uri or ""
    if _is_http(uri):
        url = f"{uri.rstrip('/')}/{page}"
        return url, f"sparsity_callbacks: sparsity charts (groups {groups}): {url}"
    command = None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        command = f"mlflow ui --backend-store-uri sqlite:///{os.path.abspath(path)}"
    elif uri.startswith("file:") or ("://" not in uri and uri not in ("databricks", "databricks-uc", "uc")):
        path = uri[len("file://") :] if uri.startswith("file://") else uri.removeprefix("file:")
        command = f"mlflow ui --backend-store-uri {os.path.abspath(path or 'mlruns')}"
    if command is None:
        where = f"run {run_id} at {uri}, tab Model metrics"
        return where, f"sparsity_callbacks: sparsity charts (groups {groups}): {where}"
    url = f"http://127.0.0.1:5000/{page}"
    value = f"{command}  # then open {url}"
    message = (
        f"sparsity_callbacks: to see the sparsity charts (groups {groups}), run\n"
        f"    {command}\n"
        f"and open {url} (or: Experiments > this run's experiment > the run > Model metrics)"
    )
    return value, message


def _get_or_create_experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # created meanwhile by another process
        if experiment is None:
            raise
        return experiment.experiment_id


def _fallback_artifact(fallback: str, record: Mapping[str, Any]) -> tuple[str, str]:
    """``(local file, upload name)`` of an artifact record of the fallback file ``fallback``.

    A fallback file is data, not a list of files to upload: only regular files directly inside its own
    artifacts folder (``<fallback stem>_artifacts/``, beside it) are replayed, whatever path the record
    names (the folder is found again if both were moved together); the upload name is a plain file name.
    Anything else raises `ValueError` naming the record."""
    folder = os.path.realpath(os.path.splitext(fallback)[0] + "_artifacts")
    recorded, name = record.get("path"), record.get("name")
    artifact_path = record.get("artifact_path")
    if not (isinstance(recorded, str) and isinstance(name, str) and isinstance(artifact_path, (str, type(None)))):
        raise ValueError(f"{fallback!r}: an artifact record has no file `path` / `name`; it is not replayed.")
    local = os.path.join(folder, os.path.basename(recorded))
    if (
        os.path.dirname(os.path.realpath(local)) != folder
        or not os.path.isfile(local)
        or os.path.islink(local)
        or name in ("", ".", "..")
        or os.path.basename(name) != name
    ):
        raise ValueError(
            f"{fallback!r}: artifact record {os.path.basename(recorded)!r} does not name a file of this fallback's "
            f"own artifacts folder {folder!r}; only those are uploaded. HINT: keep the fallback file and its "
            "`_artifacts` folder together, as `close` wrote them."
        )
    return local, name


def _replay_fallback(path: str, tracking_uri: str | None = None, *, run_id: str | None = None) -> str:
    """Send a fallback file written by `MLflowSink.close` to MLflow, synchronously; return the run id.

    The target run: ``run_id`` if given, else the file's run if it exists under the tracking URI
    (``tracking_uri``, else the file's), else a new run in the file's experiment. Metrics keep their
    steps and timestamps (re-sending ones that did arrive does not duplicate them in SQL stores).
    Raises on any MLflow error.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (ValueError, RecursionError) as err:  # bad JSON, not UTF-8, nested too deeply
        raise ValueError(f"{path!r} is not a sparsity_callbacks MLflow fallback file ({type(err).__name__}).") from None
    if not records or not isinstance(records[0], dict) or records[0].get("type") != "header":
        raise ValueError(f"{path!r} is not a sparsity_callbacks MLflow fallback file (no header line).")
    header = records[0]
    if header.get("version") != _FALLBACK_VERSION:
        raise ValueError(
            f"{path!r} has fallback format version {header.get('version')!r}; expected {_FALLBACK_VERSION}."
        )
    for record in records[1:]:  # check every record before anything is sent
        if not isinstance(record, dict) or record.get("type") not in _RECORD_TYPES:
            raise ValueError(f"{path!r} holds a record whose type is not one of {', '.join(_RECORD_TYPES)}.")
        if record["type"] == "artifact":
            _fallback_artifact(path, record)
    uri = tracking_uri or header.get("tracking_uri")
    client = MlflowClient(uri)
    target = run_id
    if target is None and header.get("run_id"):
        try:
            client.get_run(header["run_id"])
            target = header["run_id"]
        except MlflowException:
            target = None
    if target is None:
        if header.get("experiment"):
            experiment_id = _get_or_create_experiment(client, header["experiment"])
        else:
            experiment_id = header.get("experiment_id") or "0"
        target = client.create_run(experiment_id, run_name=header.get("run_name")).info.run_id
        _log.info("_replay_fallback: created run %s in experiment %s at %s.", target, experiment_id, uri)

    metrics: list[Any] = []

    def flush_metrics() -> None:
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            client.log_batch(target, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])
        metrics.clear()

    for record in records[1:]:
        kind = record["type"]
        if kind == "metrics":
            metrics.extend(Metric(k, v, t, s) for k, v, t, s in record["metrics"])
            continue
        flush_metrics()
        if kind == "params":
            items = list(record["params"].items())
            for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
                client.log_batch(target, params=[Param(k, v) for k, v in items[i : i + _MAX_PARAMS_PER_BATCH]])
        elif kind == "tags":
            client.log_batch(target, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif kind == "artifact":
            local, name = _fallback_artifact(path, record)
            with tempfile.TemporaryDirectory() as tmp:
                named = os.path.join(tmp, name)
                shutil.copyfile(local, named)
                client.log_artifact(target, named, record["artifact_path"])
        elif kind == "terminate":
            client.set_terminated(target, record["status"])
    flush_metrics()
    return target
