"""Screenshots of a Rebound run in the Prefect UI: its flow run page and its summary artifact.

    python -m deployments.screenshot --api-url http://127.0.0.1:4200/api \\
        --flow-run-id 0c1f... --out deployments/screenshots

Uses headless Chromium (Debian's `chromium` package) and nothing else; it sets no environment
variable or Prefect setting. The server must serve its UI with the API address a browser can
reach: on a port other than 4200 start it with `PREFECT_UI_API_URL=http://HOST:PORT/api`, or the
UI calls port 4200 and shows "Can't connect to Server API" (checked here through /ui-settings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

CHROMIUM_TIMEOUT = timedelta(seconds=120)
"""One page: Chromium starts, the UI loads and renders (5-10 s here)."""

ERROR_MARKERS = ("Not Found", "Can't connect", "Unable to connect", "Failed to connect",
                 "Something went wrong", "Failed to render")
"""Text of the Prefect UIs' error pages: v1 "Page Not Found" and "Can't connect to Server API",
v2 "Flow Run Not Found" and "Unable to connect to Prefect server", a component that failed."""


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
"""Executable names of Chromium, tried in this order."""


class ScreenshotError(RuntimeError):
    """The page could not be captured, or what was captured is an error page."""


@dataclass(frozen=True)
class Shot:
    """One captured page."""

    name: str
    url: str
    png: Path
    html: str
    """The page's DOM after it rendered (`chromium --dump-dom`)."""

    @property
    def text(self) -> str:
        """The visible text of the page, whitespace collapsed."""
        body = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", self.html)
        return " ".join(re.sub(r"<[^>]+>", " ", body).split())

    def error(self) -> str | None:
        """The error marker the page shows, if it is an error page."""
        return next((m for m in ERROR_MARKERS if m in self.text), None)


def _http_json(url: str, body: dict | None = None, timeout: float = 30.0) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def ui_root(api_url: str) -> str:
    """The UI's address: the API URL without its `/api` suffix."""
    return re.sub(r"/api/?$", "", api_url.rstrip("/"))


def ui_base(api_url: str, ui: str = "default") -> str:
    """The base URL of the chosen UI ("v1", "v2" or the server's default).

    Raises:
        ScreenshotError: the UI would call another API than `api_url` (PREFECT_UI_API_URL unset
            on a server whose port is not 4200), or the chosen UI is not served.
    """
    root = ui_root(api_url)
    settings = _http_json(f"{root}/ui-settings")
    assert isinstance(settings, dict)
    if str(settings.get("api_url", "")).rstrip("/") != api_url.rstrip("/"):
        raise ScreenshotError(
            f"the UI at {root} calls the API at {settings.get('api_url')}, not {api_url}: start "
            f"the server with PREFECT_UI_API_URL={api_url}")
    version = settings.get("default_ui", "v1") if ui == "default" else ui
    base = settings.get(f"{version}_base_url")
    if base is None:
        raise ScreenshotError(f"the server does not serve the {version} UI "
                              f"(it serves {settings.get('available_uis')})")
    return root + str(base).rstrip("/")


def summary_artifact_id(api_url: str, flow_run_id: str, key: str = "rebound-summary") -> str:
    """The newest artifact with this key created by the flow run."""
    found = _http_json(f"{api_url.rstrip('/')}/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}},
        "sort": "CREATED_DESC", "limit": 1})
    if not found:
        raise ScreenshotError(f"flow run {flow_run_id} has no artifact {key!r}")
    assert isinstance(found, list)
    return str(found[0]["id"])


def chromium_binary() -> str:
    """Chromium's executable. Raises ScreenshotError naming the package when it is missing."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise ScreenshotError("no headless browser: install Debian's `chromium` package "
                          "(apt-get install chromium)")


def capture(url: str, png: Path, window: tuple[int, int] = (1400, 1100),
            timeout: timedelta = CHROMIUM_TIMEOUT) -> str:
    """Render `url` in headless Chromium, write a PNG of the window and return the DOM.

    Raises:
        ScreenshotError: Chromium failed or ran past `timeout`.
    """
    png.parent.mkdir(parents=True, exist_ok=True)
    # A profile of its own: two captures at once never share (and lock) one, and nothing is
    # left in the user's home. Virtual time lets the UI's requests and timers settle.
    with tempfile.TemporaryDirectory(prefix="rebound-chromium-") as profile:
        command = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
                   f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
                   "--hide-scrollbars", "--virtual-time-budget=30000",
                   f"--screenshot={png}", "--dump-dom", url]
        # Its own session: on a timeout the browser and every helper process it started go.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            html, err = proc.communicate(timeout=timeout.total_seconds())
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"chromium ran past {timeout.total_seconds():.0f} s on "
                                  f"{url}") from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if proc.returncode != 0 or not png.is_file():
        raise ScreenshotError(f"chromium exited {proc.returncode} on {url}: {err[-1000:]}")
    return html


def screenshot_run(api_url: str, flow_run_id: str, out: Path, ui: str = "default",
                   artifact_key: str = "rebound-summary") -> list[Shot]:
    """PNGs of the flow run's page and of its summary artifact, in `out`.

    Raises:
        ScreenshotError: a page could not be captured or is an error page.
    """
    base = ui_base(api_url, ui)
    artifact = summary_artifact_id(api_url, flow_run_id, artifact_key)
    pages = [("flow-run", f"{base}/runs/flow-run/{flow_run_id}", (1400, 1100)),
             # Taller: the headline table, the loss curve and the goodput bar in one picture.
             ("summary-artifact", f"{base}/artifacts/artifact/{artifact}", (1400, 1700))]
    shots = []
    for name, url, window in pages:
        png = out / f"{name}.png"
        shot = Shot(name, url, png, capture(url, png, window))
        if marker := shot.error():
            raise ScreenshotError(f"{url} shows an error page ({marker!r})")
        shots.append(shot)
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.screenshot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", required=True, help="the server's API, e.g. "
                        "http://127.0.0.1:4200/api")
    parser.add_argument("--flow-run-id", required=True, help="the rebound-train flow run")
    parser.add_argument("--out", type=Path, default=Path("deployments/screenshots"),
                        help="folder for flow-run.png and summary-artifact.png")
    parser.add_argument("--ui", choices=("default", "v1", "v2"), default="default",
                        help="which of the server's UIs (default: the one it opens by default)")
    parser.add_argument("--json", action="store_true", help="print what was captured as JSON")
    args = parser.parse_args(argv)
    try:
        shots = screenshot_run(args.api_url, args.flow_run_id, args.out, args.ui)
    except (ScreenshotError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"name": s.name, "url": s.url, "png": str(s.png)} for s in shots]))
    else:
        for s in shots:
            print(f"{s.png}  <- {s.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
