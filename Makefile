# One task runner; CI calls these targets unchanged. Both targets install what is missing first.
.PHONY: setup run test test-fast lint schemas bench

setup:
	scripts/bootstrap.sh

run: setup
	.venv/bin/scanwatch run

test: setup
	.venv/bin/python -m pytest

# Unit tests only (no broker, no services).
test-fast: setup
	.venv/bin/python -m pytest -m "not integration and not e2e"

lint: setup
	.venv/bin/python -m ruff check .

schemas: setup
	.venv/bin/python -m schemas.export
