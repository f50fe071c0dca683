"""The model registry: one SQLite table beside the model repository, and the lifecycle rules.

``<repository>/registry.sqlite`` has one row per (model name, version): status, dataset
fingerprint, held-out metrics, creation time, where the version lives. The repository folders
stay the truth for serving (TensorFlow Serving serves the highest version folder of
``<repository>/<name>/``); the registry records why each version is where it is.

Lifecycle of a version:

``reserved`` (a job took the number) → ``candidate`` (exported into
``<repository>/.staging/<name>/<version>/``, not visible to servers) → ``serving`` (renamed into
``<repository>/<name>/<version>/``; being the highest, servers pick it up) → ``superseded``
(a newer version is served; the folder stays, ready for a rollback) or ``rolled-back`` (withdrawn
to ``<repository>/.retired/<name>/<version>/``). A candidate that is worse than the served
version becomes ``rejected``; a job that fails leaves its number ``failed``. Numbers are never
reused: two jobs never write the same version.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scanwatch.durable import fsync_dir, rename_durable
from scanwatch.model_repository import SAVED_MODEL_FILE, published_versions, version_folders

REGISTRY_FILE = "registry.sqlite"
#: A trained version's evaluation report: ``<run_dir>/evaluation/`` holds the JSON, the Markdown
#: and the PNG plots (written by ``training.evaluate``, shown by the console).
EVALUATION_DIR = "evaluation"
REPORT_JSON = "evaluation.json"
REPORT_MARKDOWN = "evaluation.md"
STAGING = ".staging"
RETIRED = ".retired"

RESERVED, CANDIDATE, SERVING = "reserved", "candidate", "serving"
SUPERSEDED, ROLLED_BACK, REJECTED, FAILED = "superseded", "rolled-back", "rejected", "failed"
STATUSES = (RESERVED, CANDIDATE, SERVING, SUPERSEDED, ROLLED_BACK, REJECTED, FAILED)
#: Study-level promotion metrics (keys of a version's ``metrics``), compared in this order:
#: the best study sensitivity at specificity >= 0.90 on the test studies (the issue's benchmark
#: bar, read off the ROC so each model is judged at its best point for that specificity, not at
#: a threshold chosen on other data), then study AUROC (breaks the ties of two models that both
#: reach sensitivity 1.0). A candidate that has them is compared on them; one trained on a
#: dataset without studies (folders, HAM10000, DICOM) is compared on held-out macro-F1.
STUDY_SENSITIVITY_AT_SPECIFICITY = "study_sensitivity_at_spec90"
STUDY_AUROC = "study_auroc"
STUDY_PROMOTION_METRICS = (STUDY_SENSITIVITY_AT_SPECIFICITY, STUDY_AUROC)
#: The specificity :data:`STUDY_SENSITIVITY_AT_SPECIFICITY` is read at.
PROMOTION_MIN_SPECIFICITY = 0.90

_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    status TEXT NOT NULL,
    dataset_fingerprint TEXT,
    macro_f1 REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    class_names TEXT NOT NULL DEFAULT '[]',
    threshold REAL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    job_id TEXT,
    run_dir TEXT,
    dataset_path TEXT,
    note TEXT,
    PRIMARY KEY (name, version)
)
"""


class PromotionRefused(RuntimeError):
    """The candidate is worse than the served version on the promotion metric (study-level
    when both were measured on studies, else held-out macro-F1)."""


class LifecycleError(RuntimeError):
    """The requested transition does not apply to the version's current state."""


@dataclass(frozen=True)
class ModelVersion:
    """One registry row."""

    name: str
    version: int
    status: str
    dataset_fingerprint: str | None
    macro_f1: float | None
    metrics: dict[str, Any]
    class_names: list[str]
    threshold: float | None
    created: str
    updated: str
    job_id: str | None
    run_dir: str | None
    dataset_path: str | None
    note: str | None

    @property
    def report_dir(self) -> Path | None:
        """The folder of this version's evaluation report, if its run recorded one."""
        if not self.run_dir:
            return None
        folder = Path(self.run_dir) / EVALUATION_DIR
        return folder if folder.is_dir() else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def study_metrics(metrics: dict[str, Any]) -> tuple[float, float] | None:
    """A version's study-level promotion metrics, if it was measured on studies."""
    values = [metrics.get(key) for key in STUDY_PROMOTION_METRICS]
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return (numbers[0], numbers[1]) if len(numbers) == len(values) else None


def _rounded(pair: tuple[float, float]) -> tuple[float, float]:
    # Equal up to float noise counts as equal (the candidate is promoted on a tie).
    return round(pair[0], 9), round(pair[1], 9)


def _pair(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f}, {pair[1]:.4f}"


class Registry:
    """The registry of one model repository. Cheap to create; every call opens its connection."""

    def __init__(self, repository: Path) -> None:
        self.repository = Path(repository)
        self.path = self.repository / REGISTRY_FILE

    # -- storage ------------------------------------------------------------------------------

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        self.repository.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.row_factory = sqlite3.Row
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)
            if write:
                # Taken before reading, so two writers never decide on the same snapshot.
                connection.execute("BEGIN IMMEDIATE")
            yield connection
            if write:
                connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    @staticmethod
    def _row(row: sqlite3.Row) -> ModelVersion:
        values = dict(row)
        values["metrics"] = json.loads(values["metrics"])
        values["class_names"] = json.loads(values["class_names"])
        return ModelVersion(**values)

    def names(self) -> list[str]:
        """The models with at least one registered version, by name."""
        if not self.path.exists():
            return []
        with self._connect() as db:
            rows = db.execute("SELECT DISTINCT name FROM model_versions ORDER BY name").fetchall()
        return [r["name"] for r in rows]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every registered version of ``name``, ascending."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM model_versions WHERE name = ? ORDER BY version", (name,)
            ).fetchall()
        return [self._row(r) for r in rows]

    def get(self, name: str, version: int) -> ModelVersion:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
        if row is None:
            raise LookupError(f"{name} version {version} is not in the registry")
        return self._row(row)

    def serving(self, name: str) -> ModelVersion | None:
        """The registered version that servers answer with (the highest served folder)."""
        served = self.served_versions(name)
        if not served:
            return None
        try:
            return self.get(name, served[-1])
        except LookupError:
            return None

    # -- folders ------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        return self.repository / name

    def staging_dir(self, name: str, version: int | None = None) -> Path:
        folder = self.repository / STAGING / name
        return folder if version is None else folder / str(version)

    def retired_dir(self, name: str, version: int | None = None) -> Path:
        folder = self.repository / RETIRED / name
        return folder if version is None else folder / str(version)

    def served_versions(self, name: str) -> list[int]:
        """Versions in the served folder holding a SavedModel, ascending."""
        return published_versions(self.model_dir(name))

    def location(self, name: str, version: int) -> Path | None:
        for folder in (self.model_dir(name), self.staging_dir(name), self.retired_dir(name)):
            candidate = folder / str(version)
            if (candidate / SAVED_MODEL_FILE).is_file():
                return candidate
        return None

    # -- transitions --------------------------------------------------------------------------

    def job_version(self, name: str, job_id: str) -> ModelVersion | None:
        """The version a job reserved, if it did."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM model_versions WHERE name = ? AND job_id = ? ORDER BY version DESC",
                (name, job_id),
            ).fetchone()
        return None if row is None else self._row(row)

    def reserve(self, name: str, job_id: str | None = None, run_dir: str | None = None) -> int:
        """Take the next version number for ``name`` (never one used before, by row or folder).

        A job that reserved a number and did not finish (same ``job_id``) gets it back.
        """
        with self._connect(write=True) as db:
            if job_id is not None:
                earlier = db.execute(
                    "SELECT version FROM model_versions WHERE name = ? AND job_id = ? "
                    "AND status = ?",
                    (name, job_id, RESERVED),
                ).fetchone()
                if earlier is not None:  # the same job, resumed: keep its number
                    return int(earlier["version"])
            highest_row = (
                db.execute(
                    "SELECT MAX(version) FROM model_versions WHERE name = ?", (name,)
                ).fetchone()[0]
                or 0
            )
            highest_folder = max(
                (
                    max(version_folders(folder), default=0)
                    for folder in (
                        self.model_dir(name),
                        self.staging_dir(name),
                        self.retired_dir(name),
                    )
                ),
                default=0,
            )
            version = max(highest_row, highest_folder) + 1
            now = _now()
            db.execute(
                "INSERT INTO model_versions (name, version, status, created, updated, job_id, "
                "run_dir) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, version, RESERVED, now, now, job_id, run_dir),
            )
        return version

    def record_candidate(
        self,
        name: str,
        version: int,
        *,
        dataset_fingerprint: str,
        metrics: dict[str, Any],
        class_names: list[str],
        threshold: float,
        dataset_path: str | None = None,
    ) -> None:
        """A reserved version was exported into staging with its held-out metrics."""
        self._update(
            name,
            version,
            {RESERVED},
            CANDIDATE,
            dataset_fingerprint=dataset_fingerprint,
            macro_f1=float(metrics["macro_f1"]),
            metrics=json.dumps(metrics),
            class_names=json.dumps(list(class_names)),
            threshold=threshold,
            dataset_path=dataset_path,
        )

    def mark_failed(self, name: str, version: int, reason: str) -> None:
        self._update(name, version, {RESERVED, CANDIDATE}, FAILED, note=reason[:2000])

    def register_existing(
        self,
        name: str,
        version: int,
        *,
        status: str,
        dataset_fingerprint: str | None,
        metrics: dict[str, Any],
        class_names: list[str],
        threshold: float,
        note: str | None = None,
    ) -> None:
        """Record a version that was put into the repository without a job (the default model)."""
        now = _now()
        with self._connect(write=True) as db:
            db.execute(
                "INSERT OR IGNORE INTO model_versions (name, version, status, dataset_fingerprint,"
                " macro_f1, metrics, class_names, threshold, created, updated, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    status,
                    dataset_fingerprint,
                    metrics.get("macro_f1"),
                    json.dumps(metrics),
                    json.dumps(class_names),
                    threshold,
                    now,
                    now,
                    note,
                ),
            )

    def _update(
        self, name: str, version: int, allowed: set[str], status: str, **fields: Any
    ) -> None:
        with self._connect(write=True) as db:
            row = db.execute(
                "SELECT status FROM model_versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
            if row is None:
                raise LookupError(f"{name} version {version} is not in the registry")
            if row["status"] not in allowed:
                raise LifecycleError(
                    f"{name} version {version} is {row['status']}, not {' or '.join(allowed)}"
                )
            assignments = {"status": status, "updated": _now(), **fields}
            db.execute(
                f"UPDATE model_versions SET {', '.join(f'{k} = ?' for k in assignments)} "
                "WHERE name = ? AND version = ?",
                (*assignments.values(), name, version),
            )

    def _set_status(
        self, db: sqlite3.Connection, name: str, version: int, status: str, note: str | None = None
    ) -> None:
        db.execute(
            "UPDATE model_versions SET status = ?, updated = ?, note = COALESCE(?, note) "
            "WHERE name = ? AND version = ?",
            (status, _now(), note, name, version),
        )

    def promote(
        self,
        name: str,
        version: int,
        *,
        serving_macro_f1: float | None = None,
        serving_study: tuple[float, float] | None = None,
        force: bool = False,
    ) -> int | None:
        """Serve ``version`` if it is at least as good as the served version; return the previous.

        A candidate with study-level metrics (:data:`STUDY_PROMOTION_METRICS`) is compared on
        them when the served version's are known: ``serving_study`` (its metrics on the
        candidate's study test split, with its own study rule) or else those recorded with it.
        Otherwise the comparison is held-out macro-F1: ``serving_macro_f1`` is the served
        version's macro-F1 on the candidate's held-out set (the caller evaluates it when the two
        were measured on different data); by default the served version's recorded macro-F1 is
        used. ``force`` skips the comparison (an operator's explicit decision). Raises
        :class:`PromotionRefused` (the candidate becomes ``rejected``) when it is worse.
        """
        refused: PromotionRefused | None = None
        with self._connect(write=True) as db:
            row = db.execute(
                "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
            if row is None:
                raise LookupError(f"{name} version {version} is not in the registry")
            candidate = self._row(row)
            if candidate.status not in (CANDIDATE, ROLLED_BACK, REJECTED):
                raise LifecycleError(
                    f"{name} version {version} is {candidate.status}; only a candidate, rejected"
                    " or rolled-back version can be promoted"
                )
            served = self.served_versions(name)
            previous = served[-1] if served else None
            if previous is not None and previous > version:
                raise LifecycleError(
                    f"version {previous} is served and newer than {version}: roll back to "
                    f"{version} instead"
                )
            compared_on_studies = False
            if not force and previous is not None:
                study_baseline = serving_study
                if study_baseline is None:
                    current = db.execute(
                        "SELECT metrics FROM model_versions WHERE name = ? AND version = ?",
                        (name, previous),
                    ).fetchone()
                    if current is not None:
                        study_baseline = study_metrics(json.loads(current["metrics"]))
                mine = study_metrics(candidate.metrics)
                if mine is not None and study_baseline is not None:
                    compared_on_studies = True
                    if _rounded(mine) < _rounded(study_baseline):
                        self._set_status(
                            db,
                            name,
                            version,
                            REJECTED,
                            f"study sensitivity at specificity 0.90, AUROC {_pair(mine)} < "
                            f"served {_pair(study_baseline)}",
                        )
                        refused = PromotionRefused(
                            f"{name} version {version}: study test split sensitivity at "
                            f"specificity >= 0.90, AUROC {_pair(mine)} is below version "
                            f"{previous}'s {_pair(study_baseline)}; not promoted"
                        )
            if not force and previous is not None and not compared_on_studies:
                baseline = serving_macro_f1
                if baseline is None:
                    current = db.execute(
                        "SELECT macro_f1 FROM model_versions WHERE name = ? AND version = ?",
                        (name, previous),
                    ).fetchone()
                    baseline = current["macro_f1"] if current is not None else None
                if baseline is not None and (candidate.macro_f1 or 0.0) < baseline:
                    self._set_status(
                        db,
                        name,
                        version,
                        REJECTED,
                        f"macro-F1 {candidate.macro_f1 or 0.0:.4f} < served {baseline:.4f}",
                    )
                    refused = PromotionRefused(
                        f"{name} version {version}: held-out macro-F1 "
                        f"{candidate.macro_f1 or 0.0:.4f} is below version {previous}'s "
                        f"{baseline:.4f}; not promoted"
                    )
            if refused is None:
                self._serve(db, name, version, previous)
        if refused is not None:
            raise refused
        return previous

    def _serve(self, db: sqlite3.Connection, name: str, version: int, previous: int | None) -> None:
        source = self.location(name, version)
        if source is None:
            raise LifecycleError(f"{name} version {version} has no SavedModel on disk")
        target = self.model_dir(name) / str(version)
        if source != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            rename_durable(source, target)  # atomic: servers see the whole version at once
        self._set_status(db, name, version, SERVING)
        if previous is not None and previous != version:
            self._set_status(db, name, previous, SUPERSEDED)

    def rollback(self, name: str, to_version: int | None = None) -> tuple[int, int]:
        """Serve an older version again: withdraw every served version above it.

        ``to_version`` defaults to the served version just below the current one. Returns
        ``(withdrawn current version, version now served)``. Withdrawn folders move to
        ``<repository>/.retired/<name>/`` (kept, so they can be promoted again).
        """
        with self._connect(write=True) as db:
            served = self.served_versions(name)
            if not served:
                raise LifecycleError(f"{name} has no served version to roll back from")
            current = served[-1]
            if to_version is None:
                if len(served) < 2:
                    raise LifecycleError(f"{name} has no older served version than {current}")
                to_version = served[-2]
            if to_version >= current:
                raise LifecycleError(f"version {to_version} is not older than {current}")
            if to_version not in served:
                source = self.location(name, to_version)
                if source is None:
                    raise LifecycleError(f"{name} version {to_version} has no SavedModel on disk")
                os.rename(source, self.model_dir(name) / str(to_version))
            retired = self.retired_dir(name)
            retired.mkdir(parents=True, exist_ok=True)
            for version in [v for v in served if v > to_version]:
                os.rename(self.model_dir(name) / str(version), retired / str(version))
                self._set_status(
                    db, name, version, ROLLED_BACK, f"rolled back to version {to_version}"
                )
            fsync_dir(self.model_dir(name))
            fsync_dir(retired)
            self._set_status(db, name, to_version, SERVING)
        return current, to_version
