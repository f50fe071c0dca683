# One task runner; CI calls these targets unchanged. Both targets install what is missing first.
.PHONY: setup run test test-fast lint schemas

setup:
	scripts/bootstrap.sh

run: setup
	.venv/bin/scanwatch run

test: setup
	.venv/bin/python -m pytest

# Everything but the end-to-end tests (which start the whole stack).
test-fast: setup
	.venv/bin/python -m pytest -m "not e2e"

lint: setup
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .

schemas: setup
	.venv/bin/python -m schemas.export
