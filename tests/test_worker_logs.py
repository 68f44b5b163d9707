"""What Dask workers print: a heartbeat that meets a closed scheduler (every failed run closes
its cluster at once) is one line, never a traceback in the user's terminal."""

from __future__ import annotations

import io
import logging

from tasks.preload import OneLineHeartbeatFailure


def _logged(message: str) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("rebound.test.worker-logs")
    logger.addHandler(handler)
    logger.addFilter(OneLineHeartbeatFailure())
    try:
        try:
            raise OSError("Stream is closed")
        except OSError:
            logger.exception(message)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_a_failed_heartbeat_is_one_line() -> None:
    text = _logged("Failed to communicate with scheduler during heartbeat.")
    assert "Traceback" not in text and text.count("\n") == 1


def test_other_worker_errors_keep_their_traceback() -> None:
    assert "Traceback" in _logged("Compute Failed")


def test_workers_install_it() -> None:
    import tasks.preload  # noqa: F401 - what every worker runs at start

    assert any(isinstance(f, OneLineHeartbeatFailure)
               for f in logging.getLogger("distributed.worker").filters)
