"""`python -m tests.kept_coordinator_starter`: start the kept coordinator as the end of a run
of `python -m flows.train` does (the same key: run as a module from the same directory), and
print its PID as JSON."""

import json
import os

from flows.kept_coordinator import coordinator_key, keep
from flows.prefect_env import prepare_environment

if __name__ == "__main__":
    key = coordinator_key()
    prepare_environment()
    print(json.dumps({"pid": keep(key, dict(os.environ))}))
