"""Imported first by the workers' forkserver (flows/worker_forkserver.py): the server is
SIGKILLed when the CLI that started it dies, however it dies, instead of finishing seconds of
imports as an orphan. Linux only (prctl); a fork clears the setting, so workers keep their own
lifetime (Dask ties each to its nanny)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1

try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
except (OSError, AttributeError):
    pass
