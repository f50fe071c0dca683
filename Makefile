# One task runner; CI calls these targets unchanged. Every target installs what is missing first.
.PHONY: setup run test test-fast lint schemas audit fuzz

# The packages mypy checks (tests, bench and migrations are left out in pyproject.toml).
PACKAGES = schemas scanwatch devtools dicom_listener inference_worker services training

# The chatbot's tests run in Rasa's own virtualenv, with the project root on the path for the
# plain modules they share (scanwatch.ids, services.auth).
CHATBOT_PYTEST = cd chatbot && PYTHONPATH=..:. RASA_TELEMETRY_ENABLED=false ../.venv-rasa/bin/python -m pytest

setup:
	scripts/bootstrap.sh

run: setup
	.venv/bin/scanwatch run

# What a machine built once and any clone may reuse (scripts/bootstrap.sh uses the same folder).
CACHE ?= $(or $(SCANWATCH_CACHE),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/scanwatch),$(HOME)/.cache/scanwatch)

# pytest-xdist workers: half the suite's time is spent waiting on brokers, databases and
# servers, so two processes on two cores finish far sooner than one. A test file runs whole on
# one worker (its module fixtures start once). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

# Both environments: scanwatch's tests (.venv), then the chatbot's (.venv-rasa, from chatbot/:
# its actions, channel and tracker store; the trained model judged by rasa test nlu and the
# end-to-end test stories).
test: setup
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile
	$(CHATBOT_PYTEST)

# Unit tests only: no broker, database, DICOM peer, model server or stack (marker `unit`,
# given by conftest.py to every test not marked `integration` or `e2e`).
test-fast: setup
	.venv/bin/python -m pytest -m unit
	$(CHATBOT_PYTEST) tests/test_actions.py tests/test_channel.py

# Style, types and the import rules of ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
lint: setup
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check .
	MYPY_CACHE_DIR=$(CACHE)/mypy .venv/bin/python -m mypy $(PACKAGES)
	.venv/bin/lint-imports

schemas: setup
	.venv/bin/python -m schemas.export

# The listener's parsers under atheris, 5 minutes a target; the corpus is minimized into
# dicom_listener/fuzz/corpus/ and the figures appended to bench/fuzz_listener.md.
fuzz: setup
	.venv/bin/python bench/fuzz_listener.py --seconds 300

# Known vulnerabilities in both lock files (pip-audit in var/audit/venv; needs the network, so
# not part of `make test`). Says loudly what it could not audit and exits 0 then; exit 1: a
# vulnerability neither fixed nor accepted in SECURITY.md. AUDIT_FLAGS=--strict: exit 2 when
# some pins were not audited.
audit: setup
	.venv/bin/python scripts/audit.py $(AUDIT_FLAGS)
