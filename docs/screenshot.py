"""Render ``docs/mlflow_ui.png``: the MLflow UI charts of a run made by ``examples/trl_grpo.py``.

    cd /tmp/grpo && python /path/to/examples/trl_grpo.py --tiny    # writes ./mlflow.db
    python docs/screenshot.py --store /tmp/grpo/mlflow.db [--run-id ID] [--out docs/mlflow_ui.png]

Starts ``mlflow server`` on 127.0.0.1 against the store, opens the run's "Model metrics" tab (the address
the callback prints at the end of training) in headless Chromium (Debian: ``apt-get install -y chromium``),
closes the MLflow Assistant side panel, scrolls the chart group ``sparsity`` to the top, as a user
scrolling down to it would (nothing is typed into the search box), and saves a PNG; the server is stopped
afterwards. Driven through the DevTools protocol over a pipe, standard library only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_sparsity_run(store_uri: str) -> tuple[str, str]:
    """(experiment id, run id) of the newest run that has ``sparsity/changed_fraction``."""
    from mlflow import MlflowClient

    client = MlflowClient(store_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "metrics.`sparsity/changed_fraction` >= 0", order_by=["attributes.start_time DESC"])
    if not runs:
        raise SystemExit(f"No run with sparsity metrics in {store_uri}. Run examples/trl_grpo.py first.")
    return runs[0].info.experiment_id, runs[0].info.run_id


class _DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4), standard library only."""

    def __init__(self, chromium: str, width: int, height: int) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: fd 3 = what it reads, fd 4 = what it writes
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self._profile = tempfile.mkdtemp(prefix="chromium_")
        self.process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=tuple(sorted({to_child_r, from_child_w, 3, 4})),
            preexec_fn=wire,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            self.process.kill()
        self.process.wait(timeout=30)
        shutil.rmtree(self._profile, ignore_errors=True)


_PAGE_READY = """(() => !!document.querySelector('input[placeholder*="Search metric charts"]'))()"""
_PLOTS_DRAWN = "document.querySelectorAll('.js-plotly-plot').length"
_SCROLL_TO_GROUP = """(() => {
  const title = [...document.querySelectorAll('*')].find(
    e => e.childElementCount === 0 && e.textContent.trim() === %s);
  if (!title) return false;
  title.scrollIntoView({block: 'start'});
  return true;
})()"""
_CLOSE_ASSISTANT = """(() => {
  const buttons = [...document.querySelectorAll('button')].filter(b => {
    const r = b.getBoundingClientRect();
    return r.top < 60 && r.left > window.innerWidth * 0.7;
  });
  if (!buttons.length) return 'none';
  buttons.sort((a, b) => b.getBoundingClientRect().left - a.getBoundingClientRect().left)[0].click();
  return 'closed';
})()"""


def _capture(chromium: str, url: str, width: int, height: int, group: str, wait_s: float) -> bytes:
    tools = _DevTools(chromium, width, height)
    try:
        target = next(t for t in tools.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        tools.session = tools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        tools.call("Page.enable")
        tools.call("Page.navigate", url=url)
        deadline = time.monotonic() + 120
        while not tools.evaluate(_PAGE_READY):
            if time.monotonic() > deadline:
                raise SystemExit("The Model metrics tab did not load.")
            time.sleep(1)
        tools.evaluate(_CLOSE_ASSISTANT)
        time.sleep(3)
        while not tools.evaluate(_SCROLL_TO_GROUP % json.dumps(group)):
            if time.monotonic() > deadline:
                raise SystemExit(f"No chart group {group!r} on the Model metrics tab.")
            time.sleep(1)
        time.sleep(wait_s)  # charts load their metric histories when they come into view
        deadline = time.monotonic() + 180  # on a busy machine, until the charts in view have drawn
        while tools.evaluate(_PLOTS_DRAWN) < 4 and time.monotonic() < deadline:
            time.sleep(2)
        tools.evaluate(_SCROLL_TO_GROUP % json.dumps(group))
        time.sleep(2)
        data = tools.call("Page.captureScreenshot", format="png")["data"]
        return base64.b64decode(data)
    finally:
        tools.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="mlflow.db", help="sqlite file written by the example")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlflow_ui.png"))
    parser.add_argument("--window", default="1400,1400")
    parser.add_argument("--wait-ms", type=int, default=15000, help="time for the charts to render")
    parser.add_argument("--group", default="sparsity", help="the chart group scrolled to the top")
    options = parser.parse_args()

    store_uri = f"sqlite:///{os.path.abspath(options.store)}"
    experiment_id, run_id = _latest_sparsity_run(store_uri)
    if options.run_id:
        from mlflow import MlflowClient

        run_id = options.run_id
        experiment_id = MlflowClient(store_uri).get_run(run_id).info.experiment_id
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("Chromium not found. HINT: apt-get update && apt-get install -y chromium")

    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            store_uri,
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("mlflow server did not start") from None
                time.sleep(0.5)
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
        width, height = (int(v) for v in options.window.split(","))
        png = _capture(chromium, url, width, height, options.group, options.wait_ms / 1000)
        with open(options.out, "wb") as f:
            f.write(png)
        print(f"{options.out}: {url} scrolled to the group {options.group!r} ({len(png) / 1024:.0f} KB)")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
