"""The long fuzzing run of the listener's parsers: each target of ``dicom_listener/fuzz`` under
atheris for ``--seconds``, starting from the committed corpus, then the corpus minimized back
into ``dicom_listener/fuzz/corpus/<target>/`` (libFuzzer ``-merge=1``) and a table written.

    .venv/bin/python bench/fuzz_listener.py --seconds 300          # every target
    .venv/bin/python bench/fuzz_listener.py --seconds 60 --targets scan,store

Per target: inputs executed, executions per second, coverage (libFuzzer's ``cov``: edges of
the instrumented listener and ``scanwatch`` code; ``ft``: features), corpus size after
minimizing, peak RSS, and findings (crash / timeout / OOM files under ``var/fuzz/findings``,
each to be fixed and kept in ``dicom_listener/fuzz/regressions/<target>/``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("association", "pdata", "command", "file_meta", "scan", "store")
CORPUS = ROOT / "dicom_listener" / "fuzz" / "corpus"


@dataclass
class Result:
    target: str
    seconds: float
    execs: int
    cov: int
    features: int
    corpus_files: int
    corpus_bytes: int
    peak_rss_mb: int
    findings: list[str]


def _fuzz(args: list[str], log: Path, timeout: float) -> str:
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "-m", "dicom_listener.fuzz", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=os.environ | {"PYTHONWARNINGS": "ignore"},
            check=False,
        )
    return log.read_text(errors="replace")


def run_target(target: str, seconds: int, work: Path) -> Result:
    pool, findings = work / target, work / "findings"
    shutil.rmtree(pool, ignore_errors=True)
    pool.mkdir(parents=True)
    findings.mkdir(parents=True, exist_ok=True)
    committed = CORPUS / target
    for path in sorted(committed.glob("*")) if committed.is_dir() else []:
        shutil.copy(path, pool / path.name)
    started = time.monotonic()
    text = _fuzz(
        [
            target,
            str(pool),
            f"-max_total_time={seconds}",
            "-seed=1",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={findings}/{target}-",
        ],
        work / f"{target}.log",
        seconds + 600,
    )
    elapsed = time.monotonic() - started  # the fuzzing itself (start-up included)
    stat = dict(re.findall(r"stat::(\w+):\s*(\d+)", text))
    progress = re.findall(r"cov: (\d+) ft: (\d+)", text)
    cov, features = (int(progress[-1][0]), int(progress[-1][1])) if progress else (0, 0)
    # Minimize: the inputs that keep every feature, written back over the committed corpus.
    merged = work / f"{target}-merged"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()
    _fuzz([target, str(merged), str(pool), "-merge=1"], work / f"{target}-merge.log", 900)
    shutil.rmtree(committed, ignore_errors=True)
    committed.mkdir(parents=True)
    for path in sorted(merged.iterdir()):
        shutil.copy(path, committed / path.name)
    files = list(committed.iterdir())
    return Result(
        target=target,
        seconds=elapsed,
        execs=int(stat.get("number_of_executed_units", 0)),
        cov=cov,
        features=features,
        corpus_files=len(files),
        corpus_bytes=sum(p.stat().st_size for p in files),
        peak_rss_mb=int(stat.get("peak_rss_mb", 0)),
        findings=sorted(p.name for p in findings.glob(f"{target}-*")),
    )


def table(results: list[Result], seconds: int) -> str:
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {seconds} s per target, seed 1, "
        f"`.venv/bin/python bench/fuzz_listener.py --seconds {seconds}` "
        f"({os.cpu_count()} cores, one process):",
        "",
        "| target | seconds | inputs run | inputs/s | cov | ft | corpus (files, KiB) "
        "| peak RSS MiB | findings |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| `{r.target}` | {r.seconds:.0f} | {r.execs:,} | {r.execs / max(r.seconds, 1):,.0f} "
            f"| {r.cov} | {r.features} | {r.corpus_files}, {r.corpus_bytes / 1024:.0f} "
            f"| {r.peak_rss_mb} | {', '.join(r.findings) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=300, help="per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "fuzz")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "fuzz_listener.md")
    args = parser.parse_args(argv)
    results = []
    for target in args.targets.split(","):
        result = run_target(target, args.seconds, args.work)
        results.append(result)
        print(table([result], args.seconds).splitlines()[-1], flush=True)  # noqa: T201
    text = table(results, args.seconds)
    print(text)  # noqa: T201
    header = "# Fuzzing the listener's parsers (`bench/fuzz_listener.py`)\n\n"
    previous = args.out.read_text() if args.out.exists() else header
    args.out.write_text(previous.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
