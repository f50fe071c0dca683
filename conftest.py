"""Fixtures shared by every test layer.

``kafka`` starts one real single-node broker for the whole session (on free loopback ports, in a
temporary folder), so integration tests talk to Kafka exactly as the services do.
``signing_keys`` is the token signing key-set file every test that mints or checks access tokens
shares (one ES256 key, mode 0600); a test that changes a key set makes its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is noise in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools.kafka_local import LocalKafka, free_port
from services.auth.tokens import load_key_set

ROOT = Path(__file__).resolve().parent
KAFKA_LIBS = Path(os.environ.get("SCANWATCH_VAR", ROOT / "var")) / "kafka" / "libs"


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A running broker with scanwatch's topics created; stopped at the end of the session."""
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka"), KAFKA_LIBS, port=free_port(), controller_port=free_port()
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key-set file of the tests' access tokens (``Settings(signing_keys_file=...)``,
    ``TokenService(load_key_set(signing_keys))``); read-only by convention."""
    path = tmp_path_factory.mktemp("auth") / "signing-keys.json"
    load_key_set(path)  # creates it
    return path


#: The order test files start in, heaviest first (a file goes by its heaviest test): with the
#: suite spread over workers (``make test``: pytest-xdist, a file per worker), minutes-long stack
#: files left to the end keep one worker busy while the other has nothing left to take.
_WEIGHT = ("faults", "e2e", "integration", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test not marked ``integration`` or ``e2e`` is a ``unit`` test: in-process, with
    fakes, fast (``make test-fast`` runs only these). Files are then ordered by
    :data:`_WEIGHT`, each kept whole and in its own order."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "e2e")):
            item.add_marker(pytest.mark.unit)
    heaviest: dict[Path, int] = {}
    for item in items:
        weight = next(i for i, m in enumerate(_WEIGHT) if item.get_closest_marker(m))
        heaviest[item.path] = min(weight, heaviest.get(item.path, weight))
    items.sort(key=lambda item: heaviest[item.path])  # stable: files stay whole and in order
