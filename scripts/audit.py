"""Known vulnerabilities in the pinned dependencies of both virtualenvs (``make audit``).

Audits ``requirements.lock`` (.venv) and ``chatbot/requirements.lock`` (.venv-rasa) with
pip-audit, run from a virtualenv of its own (``var/audit/venv``, pip-audit pinned below), so
that the audit tool and its dependencies are neither in the audited environments nor in their
lock files. Every pin is asked of:

1. pip-audit's OSV service, then its PyPI service (PyPI's per-version JSON);
2. where neither answered, PyPI's project JSON, whose ``vulnerabilities`` field describes the
   project's *latest* release only: a pin at the latest release is audited by it, an older pin
   is not (and is counted as not audited).

A pin no source could audit is never counted as clean: pip-audit's PyPI service reports
"No known vulnerabilities found" with exit 0 when every dependency was skipped as "not found",
which is what it does when PyPI's per-version JSON does not answer. So the summary counts the
pins audited and says loudly when some were not.

Exit status: 1 when an audited pin has a vulnerability that SECURITY.md does not accept (its
id, or an alias, in the table "Accepted vulnerabilities"); 0 otherwise, also when the
vulnerability services are unreachable (offline CI must not fail on it); ``--strict`` turns an
incomplete audit into exit 2. The full result is written to ``var/audit/report.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = (ROOT / "requirements.lock", ROOT / "chatbot" / "requirements.lock")
#: The audit tool, pinned: installed into its own virtualenv with uv.
PIP_AUDIT = "pip-audit==2.10.1"
VENV = ROOT / "var" / "audit" / "venv"
REPORT = ROOT / "var" / "audit" / "report.json"
SECURITY = ROOT / "SECURITY.md"
PYPI_PROJECT_JSON = "https://pypi.org/pypi/{name}/json"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
#: Vulnerability ids as SECURITY.md's accepted table writes them (first column).
VULN_ID = re.compile(r"^\|\s*((?:GHSA|PYSEC|CVE|OSV)-[\w-]+)\s*\|")


@dataclass
class Vulnerability:
    id: str
    aliases: list[str]
    fix_versions: list[str]
    source: str
    accepted: bool = False


@dataclass
class Pin:
    name: str
    version: str
    #: "osv", "pypi" (pip-audit), "pypi-project-json", or None: not audited
    audited_by: str | None = None
    why_not: str | None = None
    vulns: list[Vulnerability] = field(default_factory=list)


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def pins_of(lock: Path) -> list[Pin]:
    pins = []
    for line in lock.read_text().splitlines():
        if found := PIN.match(line.strip()):
            pins.append(Pin(found.group(1), found.group(2)))
    return pins


def accepted_ids(security: Path = SECURITY) -> set[str]:
    """The ids in SECURITY.md's "Accepted vulnerabilities" table."""
    if not security.exists():
        return set()
    ids, inside = set(), False
    for line in security.read_text().splitlines():
        if line.startswith("#"):
            inside = "accepted vulnerabilities" in line.lower()
        elif inside and (found := VULN_ID.match(line)):
            ids.add(found.group(1))
    return ids


def ensure_pip_audit() -> Path | None:
    """pip-audit in its own virtualenv; None when it cannot be installed (offline)."""
    tool = VENV / "bin" / "pip-audit"
    if tool.exists():
        return tool
    try:
        subprocess.run(["uv", "venv", "-q", str(VENV)], check=True, timeout=300)
        subprocess.run(
            ["uv", "pip", "install", "-q", "--python", str(VENV / "bin" / "python"), PIP_AUDIT],
            check=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        say(f"pip-audit could not be installed ({exc})")
        return None
    return tool


def run_pip_audit(tool: Path, lock: Path, service: str) -> dict[str, list[Vulnerability]] | None:
    """pip-audit's answer per audited pin (name, lower case), or None when the service did
    not answer for any pin."""
    out = REPORT.parent / f"pip-audit-{service}-{lock.parent.name}.json"
    out.unlink(missing_ok=True)
    command = [
        str(tool),
        "--requirement",
        str(lock),
        "--no-deps",
        "--disable-pip",  # the lock pins every package: nothing to resolve
        "--vulnerability-service",
        service,
        "--format",
        "json",
        "--output",
        str(out),
        "--progress-spinner",
        "off",
        "--timeout",
        "20",
    ]
    try:
        subprocess.run(command, capture_output=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired:
        return None
    if not out.exists():  # a connection error: pip-audit stopped before writing its report
        return None
    answered = {}
    for dep in json.loads(out.read_text()).get("dependencies", []):
        if "skip_reason" in dep:  # "not found on PyPI": the service did not answer for it
            continue
        answered[dep["name"].lower()] = [
            Vulnerability(v["id"], v.get("aliases", []), v.get("fix_versions", []), service)
            for v in dep.get("vulns", [])
        ]
    return answered or None


def project_json(pin: Pin) -> None:
    """PyPI's project JSON: audits ``pin`` only when it is the latest release."""
    try:
        with urllib.request.urlopen(PYPI_PROJECT_JSON.format(name=pin.name), timeout=30) as r:
            project = json.load(r)
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        pin.why_not = f"PyPI's project JSON did not answer ({type(exc).__name__})"
        return
    latest = project["info"]["version"]
    if latest != pin.version:
        pin.why_not = f"older than the latest release ({latest}): no per-version source answered"
        return
    pin.audited_by = "pypi-project-json"
    pin.vulns = [
        Vulnerability(v["id"], v.get("aliases") or [], v.get("fixed_in") or [], pin.audited_by)
        for v in project.get("vulnerabilities") or []
    ]


def audit(lock: Path, tool: Path | None) -> list[Pin]:
    pins = pins_of(lock)
    for service in ("osv", "pypi"):
        if tool is None or all(p.audited_by for p in pins):
            break
        answered = run_pip_audit(tool, lock, service)
        say(
            f"  pip-audit, {service} service: "
            + (
                f"{len(answered)} pins answered"
                if answered
                else "did not answer (unreachable, or every pin skipped)"
            )
        )
        for pin in pins:
            if pin.audited_by is None and answered and pin.name.lower() in answered:
                pin.audited_by, pin.vulns = service, answered[pin.name.lower()]
    for pin in pins:
        if pin.audited_by is None:
            project_json(pin)
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("locks", nargs="*", type=Path, default=list(LOCKS))
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 when some pins could not be audited"
    )
    args = parser.parse_args(argv)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    accepted = accepted_ids()
    tool = ensure_pip_audit()
    result, unaccepted, not_audited, total = {}, [], 0, 0
    for lock in args.locks:
        say(f"{lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock}:")
        pins = audit(lock, tool)
        for pin in pins:
            for vuln in pin.vulns:
                vuln.accepted = bool({vuln.id, *vuln.aliases} & accepted)
                if not vuln.accepted:
                    unaccepted.append((lock.name, pin, vuln))
        audited = [p for p in pins if p.audited_by]
        by = sorted({p.audited_by for p in audited if p.audited_by})
        say(f"  {len(audited)} of {len(pins)} pins audited ({', '.join(by) or 'no source'})")
        for pin in pins:
            for vuln in pin.vulns:
                state = "accepted in SECURITY.md" if vuln.accepted else "NOT ACCEPTED"
                fixed = ", ".join(vuln.fix_versions) or "no fixed version"
                say(f"  {pin.name}=={pin.version}: {vuln.id} (fixed in {fixed}) {state}")
        not_audited += len(pins) - len(audited)
        total += len(pins)
        result[str(lock)] = [asdict(p) for p in pins]
    REPORT.write_text(json.dumps(result, indent=2) + "\n")
    say(f"report: {REPORT}")
    if not_audited:
        say("")
        say("!" * 78)
        say(f"!! NOT AUDITED: {not_audited} of {total} pinned packages could not be checked for")
        say("!! known vulnerabilities: the vulnerability services did not answer (OSV, PyPI's")
        say("!! per-version JSON). Run `make audit` where they are reachable before a release.")
        say("!" * 78)
    if unaccepted:
        say(
            f"{len(unaccepted)} known vulnerabilities are neither fixed nor accepted in "
            "SECURITY.md:"
        )
        for lock_name, pin, vuln in unaccepted:
            say(f"  {lock_name}: {pin.name}=={pin.version} {vuln.id} {' '.join(vuln.aliases)}")
        return 1
    if not_audited and args.strict:
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
