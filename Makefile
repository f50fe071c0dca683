# One task runner; CI calls these targets unchanged. Every target installs what is missing first.
.PHONY: setup run test test-fast lint schemas

# The packages mypy checks (tests, bench and migrations are left out in pyproject.toml).
PACKAGES = schemas scanwatch devtools dicom_listener inference_worker services training

setup:
	scripts/bootstrap.sh

run: setup
	.venv/bin/scanwatch run

test: setup
	.venv/bin/python -m pytest

# Unit tests only: no broker, database, DICOM peer, model server or stack (marker `unit`,
# given by conftest.py to every test not marked `integration` or `e2e`).
test-fast: setup
	.venv/bin/python -m pytest -m unit

# Style, types and the import rules of ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
lint: setup
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .
	.venv/bin/python -m mypy $(PACKAGES)
	.venv/bin/lint-imports

schemas: setup
	.venv/bin/python -m schemas.export
