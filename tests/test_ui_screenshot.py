"""The Prefect UI shows a completed run and its summary artifact (issue 10).

A real `prefect server` (its UI told where its API is), a tiny run of the CLI reporting to it,
then deployments/screenshot.py takes PNGs of the run's page and of its `rebound-summary`
artifact with headless Chromium. Each PNG is decoded here (zlib + numpy) and must not be blank;
each page's rendered DOM must not be an error page, which is shown to be detected on a URL
that is one.
"""

from __future__ import annotations

import base64
import re
import shutil
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployments.screenshot import BROWSERS, Shot, capture, screenshot_run, ui_base
from flows.report import RunTally, summary_markdown
from flows.ui_artifacts import checkpoint_rows
from storage import open_store
from tests.cli_helpers import cli_args, run_cli
from tests.prefect_server import prefect_server
from tests.storage_helpers import chunk_files, flip_byte, numpy_state

needs_chromium = pytest.mark.skipif(
    all(shutil.which(name) is None for name in BROWSERS),
    reason="needs Debian's `chromium` package (headless browser): `apt-get install chromium`; "
           "scripts/bootstrap.sh installs it when run as root")


def _unpaeth(line: bytearray, above: bytes, channels: int) -> None:
    """Undo the Paeth filter in place (PNG spec 9.4): each byte needs the one decoded left of it,
    so this is a plain loop."""
    for i in range(channels):
        line[i] = (line[i] + above[i]) & 255
    for i in range(channels, len(line)):
        a, b, c = line[i - channels], above[i], above[i - channels]
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)
        line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255


def _unaverage(line: bytearray, above: bytes, channels: int) -> None:
    for i in range(len(line)):
        left = line[i - channels] if i >= channels else 0
        line[i] = (line[i] + ((left + above[i]) >> 1)) & 255


def png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) to (h, w, channels):
    zlib inflates, numpy undoes the None/Sub/Up filters, a loop the Average/Paeth ones."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert header is not None
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    raw = raw.reshape(height, width * channels + 1)
    out = np.zeros((height, width * channels), np.uint8)
    above = np.zeros(width * channels, np.uint8)
    for y, (kind, line) in enumerate(zip(raw[:, 0], raw[:, 1:], strict=True)):
        if kind == 0:
            row = line
        elif kind == 1:
            row = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint32)
            row = (row % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:
            row = line + above  # uint8 wraps modulo 256, as the filter wants
        else:
            buf = bytearray(line.tobytes())
            (_unaverage if kind == 3 else _unpaeth)(buf, above.tobytes(), channels)
            row = np.frombuffer(bytes(buf), np.uint8)
        out[y] = above = row
    return out.reshape(height, width, channels)


def assert_not_blank(path: Path) -> None:
    """Many colours and real contrast right of the UI's side bar (where the page's content is)."""
    pixels = png_pixels(path)
    content = pixels[:, pixels.shape[1] // 5:, :3].reshape(-1, 3)
    colours = len(np.unique(content, axis=0))
    spread = float(content.std())
    assert colours >= 64 and spread >= 10, f"{path} looks blank: {colours} colours, std {spread:.1f}"


def _flow_run(api_url: str, flow_name: str) -> dict:
    found = httpx.post(f"{api_url}/flow_runs/filter",
                       json={"flows": {"name": {"any_": [flow_name]}}}, timeout=30).json()
    [run] = found
    return run


@pytest.mark.slow
@needs_chromium
def test_screenshots_of_a_completed_run_and_its_summary(tmp_path: Path, corpus: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with prefect_server(tmp_path) as server:
        # The CLI reports to this server, at INFO so that the run's page carries its log lines.
        monkeypatch.setenv("PREFECT_API_URL", server.api_url)
        monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")
        done = run_cli(cli_args(tmp_path / "store", corpus, "ui-shot", "--steps", "20"))
        assert done.returncode == 0, done.stderr[-3000:]
        run = _flow_run(server.api_url, "rebound-train")
        assert run["state_type"] == "COMPLETED"

        shots = screenshot_run(server.api_url, run["id"], tmp_path / "shots")
        by_name = {s.name: s for s in shots}
        for shot in shots:
            assert shot.error() is None
            assert_not_blank(shot.png)
        page = by_name["flow-run"].text
        assert run["name"] in page and "Completed" in page
        assert "Dask dashboard: http" in page  # the flow's own log line, on its page
        artifact = by_name["summary-artifact"]
        assert "Rebound run" in artifact.text and "ui-shot" in artifact.text
        # The loss curve is an image the UI kept (its sanitiser drops an inline <svg>).
        assert 'src="data:image/svg+xml;base64,' in artifact.html
        for heading in ("Loss", "Goodput", "Checkpoints", "Failures"):
            assert heading in artifact.text

        # The error check is not vacuous: a run that does not exist gives the UI's 404 page.
        missing = f"{ui_base(server.api_url)}/runs/flow-run/00000000-0000-4000-8000-000000000000"
        png = tmp_path / "shots" / "missing.png"
        bad = Shot("missing", missing, png, capture(missing, png))
        assert bad.error() is not None, bad.text[:500]


def test_summary_artifact_draws_the_loss_and_verifies_each_checkpoint(tmp_path: Path) -> None:
    """The artifact's markdown, without a browser: a loss curve with a gap where a killed
    attempt's steps were lost, the failure marked; a rotten checkpoint listed as not verified."""
    store = open_store(str(tmp_path / "store"))
    for step in (5, 10):
        store.save("r", step, numpy_state(step), {"step": step})
    flip_byte(chunk_files(tmp_path / "store", "r", 10)[0], 7)
    rows = checkpoint_rows(str(tmp_path / "store"), "r", since_unix=0.0)
    assert [(r.step, r.verified, r.this_run) for r in rows] == [(5, True, True), (10, False, True)]
    assert rows[0].nbytes > 100_000 and len(rows[0].state_hash) == 32

    tally = RunTally("r", str(tmp_path / "store"), started_unix=0.0)
    tally.losses = [(s, 5.0 - s / 10) for s in (*range(1, 11), *range(16, 21))]
    tally.evals, tally.throughput = [(20, 3.1)], [(10, 900.0), (20, 1100.0)]
    summary = {"run_id": "r", "status": "completed", "reason": None, "final_step": 20,
               "state_hash": "ab" * 16, "resumed_from_step": None, "train_loss": 3.0,
               "eval_loss": 3.1, "wall_s": 10.0, "productive_s": 6.0, "ettr": 0.6,
               "checkpoints_committed": 2, "checkpoint_stall_s": 0.5,
               "failures": [{"kind": "kill-worker", "step": 17, "worker": "w",
                             "detected_after_s": 0.2, "recovered_after_s": 2.5}],
               "wall_breakdown": {"startup_s": 2.0, "train_s": 6.0, "recovery_s": 2.0}}
    markdown = summary_markdown(summary, tally, rows)
    assert "| throughput (tokens/s) | 1,000 tokens/s median over 2 group(s)" in markdown
    assert "**60.0%**" in markdown and "recovered after 2.5 s" in markdown
    assert "| 10 | " in markdown and "**no**" in markdown  # the rotten checkpoint
    assert "| kill-worker | 17 | w |" in markdown
    [curve, wall] = re.findall(r"\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", markdown)
    svg = base64.b64decode(curve).decode()
    assert svg.count("<polyline") == 2  # steps 1-10 and 16-20: no line across the lost steps
    assert ">kill-worker</text>" in svg and svg.count('r="4.5"') == 1  # one eval dot
    assert "recovery 2.0 s (20%)" in base64.b64decode(wall).decode()
