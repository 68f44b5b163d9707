"""Two costs Prefect's engine pays at every task run on a worker, paid once per process instead.

Profiled on a worker of this machine (a trivial task, kept API and cluster): a task run spent
~0.1 s between its submission and its first line, ten times Dask's own round trip (~0.01 s). Two
thirds of it were `hydrated_context` validating the settings the coordinator sent into a new
`Settings` model (pydantic-settings builds ~54 nested settings models and reads the environment
and dotenv files for each), a quarter was `ssl.create_default_context(cafile=certifi)` loading
the CA bundle for each of the two API clients the run creates. A batch group pays both between
its predecessor's end and its own start, an evaluation too.

- The settings a task arrives with are the coordinator's, serialized; the same dict yields the
  same model, so the model validated once is reused for every later dict equal to it (compared
  whole, as canonical JSON). The coordinator itself shares one settings object among all its
  contexts in the same way, and nothing mutates it.
- A verified TLS context depends only on its CA file: it is kept per (file, size, mtime), so a
  changed bundle is read again. The insecure variant, which Prefect mutates after creating it,
  is never shared.

Installed on import (`install()` is idempotent): the modules defining Rebound's Prefect tasks
import this one, so it is in place on any worker that runs them, ours or a user's cluster.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

KEPT = 8
"""Distinct settings (and CA files) kept per process; a run has one or two."""

_lock = threading.Lock()
_settings: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
_tls: OrderedDict[tuple[str, int, int], ssl.SSLContext] = OrderedDict()
_installed = False


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    with _lock:
        cache[key] = value
        while len(cache) > KEPT:
            cache.popitem(last=False)


def _recall(cache: OrderedDict, key: Any) -> Any:
    with _lock:
        return cache.get(key)


def validated_settings_context(serialized: dict[str, Any]) -> dict[str, Any]:
    """`serialized` (a SettingsContext's serialize()) with its profile and settings as models,
    validated once per distinct content; unchanged when it has anything else in it."""
    from prefect.context import SettingsContext

    if set(serialized) != {"profile", "settings"} or not all(
            isinstance(serialized[k], dict) for k in ("profile", "settings")):
        return serialized
    try:
        key = json.dumps(serialized, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return serialized
    models = _recall(_settings, key)
    if models is None:
        # Validated as hydrated_context itself would: the models are the ones it would build.
        validated = SettingsContext(**serialized)
        models = (validated.profile, validated.settings)
        _remember(_settings, key, models)
    return {"profile": models[0], "settings": models[1]}


def _with_settings_kept(original: Callable[..., AbstractContextManager]
                        ) -> Callable[..., AbstractContextManager]:
    @contextmanager
    def hydrated_context(serialized_context: dict[str, Any] | None = None, client: Any = None
                         ) -> Iterator[None]:
        if serialized_context and isinstance(serialized_context.get("settings_context"), dict):
            serialized_context = dict(serialized_context)
            serialized_context["settings_context"] = validated_settings_context(
                serialized_context["settings_context"])
        with original(serialized_context, client=client):
            yield

    hydrated_context.settings_kept = True  # type: ignore[attr-defined]
    return hydrated_context


class _KeptTLS:
    """The `ssl` module as Prefect's client module sees it, keeping verified contexts."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    @staticmethod
    def create_default_context(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: str | None = None,
                               capath: str | None = None, cadata: Any = None) -> ssl.SSLContext:
        if cafile is None or capath is not None or cadata is not None \
                or purpose is not ssl.Purpose.SERVER_AUTH:
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath,
                                              cadata=cadata)
        st = os.stat(cafile)
        key = (os.path.abspath(cafile), st.st_size, st.st_mtime_ns)
        ctx = _recall(_tls, key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=cafile)
            _remember(_tls, key, ctx)
        return ctx


def install() -> None:
    """Put both caches in place in this process (once)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    import prefect.client.orchestration as orchestration
    import prefect.context as context
    import prefect.flow_engine as flow_engine
    import prefect.task_engine as task_engine

    for module in (context, task_engine, flow_engine):
        current = module.hydrated_context
        if not getattr(current, "settings_kept", False):
            module.hydrated_context = _with_settings_kept(current)
    orchestration.ssl = _KeptTLS()  # type: ignore[assignment]


install()
