"""Imported first by the workers' forkserver (flows/worker_forkserver.py): the server is
SIGKILLed when the CLI that started it dies, however it dies, instead of finishing seconds of
imports as an orphan. A fork clears the setting, so workers keep their own lifetime (Dask ties
each to its nanny)."""

from flows.prefect_env import die_with_parent

die_with_parent()
