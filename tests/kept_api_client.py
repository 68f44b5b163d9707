"""`python -m tests.kept_api_client`: a process that uses the local Prefect API as a run does.

It calls flows.prefect_env.prepare_environment() (finding or starting the server kept for
REBOUND_HOME), waits until the API answers, prints one JSON line (what it got) and then holds
its use of the API until its standard input closes: the tests decide when it lets go.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    from flows.prefect_env import local_prefect_server, prepare_environment

    api = prepare_environment()
    assert api is not None, "PREFECT_API_URL must not be set for this client"
    with local_prefect_server(api):
        print(json.dumps({"pid": api.pid, "port": api.port, "kept": api.kept,
                          "started_here": api.started_here, "url": os.environ["PREFECT_API_URL"]}),
              flush=True)
        sys.stdin.read()
