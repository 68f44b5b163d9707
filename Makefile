# The README's two commands: `make run` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup run test lint bench clean

setup:
	@bash scripts/bootstrap.sh

run: setup
	$(PY) -m flows.train $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv runs .pytest_cache
