"""``scripts/audit.py`` (``make audit``) never calls a pin clean that no source answered for,
and fails only on a vulnerability SECURITY.md does not accept. pip-audit itself is replaced by
a small script that writes the JSON report pip-audit writes; PyPI is not asked."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
assert spec and spec.loader
audit = importlib.util.module_from_spec(spec)
sys.modules["audit"] = audit  # dataclasses look their module up
spec.loader.exec_module(audit)

LOCK = """# a lock file
alpha==1.0
    # via scanwatch
Beta_Pkg==2.0.post1 ; python_version >= "3.11"
gamma==3.1
"""


def fake_pip_audit(tmp_path: Path, report: dict | None) -> Path:
    """A pip-audit that writes ``report`` to --output (None: fails like a connection error)."""
    tool = tmp_path / "pip-audit"
    body = (
        f"import json, sys\nout = sys.argv[sys.argv.index('--output') + 1]\n"
        f"json.dump({report!r}, open(out, 'w'))\n"
        if report is not None
        else "import sys\nsys.exit('ConnectionError: api.osv.dev')\n"
    )
    tool.write_text(f"#!{sys.executable}\n{body}")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tool


@pytest.fixture
def lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(audit, "REPORT", tmp_path / "out" / "report.json")
    (tmp_path / "out").mkdir()
    path = tmp_path / "requirements.lock"
    path.write_text(LOCK)
    return path


def test_pins_are_read_from_the_lock(lock: Path) -> None:
    assert [(p.name, p.version) for p in audit.pins_of(lock)] == [
        ("alpha", "1.0"),
        ("Beta_Pkg", "2.0.post1"),
        ("gamma", "3.1"),
    ]


def test_every_pin_skipped_is_no_answer(lock: Path, tmp_path: Path) -> None:
    """pip-audit's PyPI service when the per-version JSON answers 404: exit 0, "no known
    vulnerabilities", every dependency skipped. That is not an audit."""
    skipped = {
        "dependencies": [
            {"name": n, "skip_reason": "Dependency not found on PyPI and could not be audited"}
            for n in ("alpha", "beta-pkg", "gamma")
        ]
    }
    assert audit.run_pip_audit(fake_pip_audit(tmp_path, skipped), lock, "pypi") is None
    assert audit.run_pip_audit(fake_pip_audit(tmp_path, None), lock, "osv") is None


def test_answers_are_kept_per_pin(lock: Path, tmp_path: Path) -> None:
    report = {
        "dependencies": [
            {"name": "alpha", "version": "1.0", "vulns": []},
            {
                "name": "gamma",
                "version": "3.1",
                "vulns": [{"id": "PYSEC-1", "aliases": ["CVE-1"], "fix_versions": ["3.2"]}],
            },
            {"name": "beta-pkg", "skip_reason": "not found"},
        ]
    }
    answered = audit.run_pip_audit(fake_pip_audit(tmp_path, report), lock, "osv")
    assert answered is not None and set(answered) == {"alpha", "gamma"}
    assert answered["gamma"][0].id == "PYSEC-1" and answered["gamma"][0].fix_versions == ["3.2"]


def test_accepted_ids_come_from_securitys_table(tmp_path: Path) -> None:
    security = tmp_path / "SECURITY.md"
    security.write_text(
        "# x\n| GHSA-aaaa-bbbb | elsewhere |\n## Accepted vulnerabilities\n\n| id | p | why |\n"
        "| --- | --- | --- |\n| PYSEC-2024-1 | foo | reasons |\n| CVE-2023-9 | bar | r |\n"
        "## Next\n| GHSA-cccc | no |\n"
    )
    assert audit.accepted_ids(security) == {"PYSEC-2024-1", "CVE-2023-9"}
    assert audit.accepted_ids(ROOT / "SECURITY.md") == set()  # none accepted today


def test_exit_status(lock: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable: 0 (loud), 2 with --strict; an unaccepted vulnerability: 1."""
    monkeypatch.setattr(audit, "ensure_pip_audit", lambda: fake_pip_audit(tmp_path, None))

    def no_answer(pin):
        pin.why_not = "offline"

    monkeypatch.setattr(audit, "project_json", no_answer)
    monkeypatch.setattr(audit, "accepted_ids", lambda: set())
    assert audit.main([str(lock)]) == 0
    assert audit.main([str(lock), "--strict"]) == 2
    saved = json.loads(audit.REPORT.read_text())
    assert all(p["audited_by"] is None for p in saved[str(lock)])

    report = {
        "dependencies": [
            {"name": "alpha", "vulns": []},
            {"name": "Beta_Pkg", "vulns": []},
            {"name": "gamma", "vulns": [{"id": "PYSEC-9", "aliases": [], "fix_versions": []}]},
        ]
    }
    monkeypatch.setattr(audit, "ensure_pip_audit", lambda: fake_pip_audit(tmp_path, report))
    assert audit.main([str(lock), "--strict"]) == 1
    monkeypatch.setattr(audit, "accepted_ids", lambda: {"PYSEC-9"})
    assert audit.main([str(lock), "--strict"]) == 0
