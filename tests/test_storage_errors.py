"""Storage errors are classified: a refusal no retry can fix is fatal, the rest transient."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import numpy as np
import pytest
from storage_helpers import SMALL_CHUNK, numpy_state, small_tmpfs

from storage import FatalStoreError, TransientStoreError, classify_os_error, open_store


@pytest.mark.parametrize("name", ["ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT"])
def test_refusals_no_retry_can_fix_are_fatal(name: str) -> None:
    code = getattr(errno, name)
    err = classify_os_error(OSError(code, "words from the system"), "/mnt/x")
    assert isinstance(err, FatalStoreError) and not isinstance(err, TransientStoreError)
    assert (err.url, err.errno_name, err.strerror) == ("/mnt/x", name, "words from the system")
    assert str(err) == f"store /mnt/x: words from the system ({name})"
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.errno_name) == (FatalStoreError, str(err), name)


def test_message_falls_back_to_the_system_words() -> None:
    err = classify_os_error(OSError(errno.ENOSPC, None), "/mnt/x")
    assert str(err) == "store /mnt/x: No space left on device (ENOSPC)"


@pytest.mark.parametrize(
    "exc", [TimeoutError("read timed out"), ConnectionResetError(errno.ECONNRESET, "reset"),
            OSError(errno.EIO, "Input/output error"), OSError("no errno at all")],
)
def test_timeouts_and_io_errors_stay_transient(exc: OSError) -> None:
    err = classify_os_error(exc, "s3://b/runs", "saving r@3")
    assert type(err) is TransientStoreError
    assert str(err) == f"saving r@3: {exc}"


def test_full_disk_fails_the_save_at_once_and_keeps_what_was_committed(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        store = open_store(str(disk), chunk_bytes=SMALL_CHUNK)
        store.save("r", 1, numpy_state(1), {"step": 1})  # ~200 KiB: fits
        store.save("r", 2, numpy_state(2), {"step": 2})
        big = {f"model/w{i}": np.full((256, 1024), i, dtype=np.float32) for i in range(3)}  # 3 MiB
        with pytest.raises(FatalStoreError) as ei:
            store.save("r", 3, big, {"step": 3})
        err = ei.value
        assert err.errno_name == "ENOSPC" and err.url == store.url
        assert str(err) == f"store {store.url}: No space left on device (ENOSPC)"
        assert "\n" not in str(err)
        # Nothing partial is visible, the staging is gone (space given back), the rest verifies.
        assert store.step_folders("r") == [1, 2] and store.steps("r") == [1, 2]
        assert not [n for n in store.backend.list_dir("r/ckpt") if n.startswith(".")]
        assert all(store.verify("r", s).ok for s in (1, 2))
        assert store.load_latest_verified("r").ref.step == 2
