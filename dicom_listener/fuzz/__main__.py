"""``python -m dicom_listener.fuzz TARGET [CORPUS_DIR ...] [-libFuzzer_flag=value ...]``

Runs one target of :mod:`dicom_listener.fuzz.targets` under atheris (libFuzzer), with the
listener's and the store layout's modules instrumented for coverage. An empty first corpus
folder is filled with the target's seeds first (with no folder, a temporary one is used);
given files instead, it runs just those inputs (a crash or timeout file, to reproduce it).
Typical flags: ``-max_total_time=60 -seed=1 -timeout=5`` (an input that takes longer than
``-timeout`` seconds is reported as a hang). Exits non-zero and writes ``crash-*`` /
``timeout-*`` files (``-artifact_prefix``) when a target fails.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["dicom_listener", "scanwatch"]):
    from dicom_listener.fuzz.seeds import seeds
    from dicom_listener.fuzz.targets import TARGETS, quiet


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in TARGETS:
        sys.exit(f"usage: python -m dicom_listener.fuzz {{{','.join(TARGETS)}}} [corpus] [flags]")
    name, rest = args[0], args[1:]
    target = TARGETS[name]
    paths = [Path(a) for a in rest if not a.startswith("-")]
    if any(path.is_file() for path in paths):  # inputs to replay (a crash file): run them
        quiet()
        atheris.Setup([sys.executable, *rest], target)
        atheris.Fuzz()
    folders = paths
    if not folders:
        folders = [Path(tempfile.mkdtemp(prefix=f"scanwatch-fuzz-{name}-"))]
        rest.append(str(folders[0]))
    folders[0].mkdir(parents=True, exist_ok=True)
    if not any(folders[0].iterdir()):
        for n, seed in enumerate(seeds(name)):
            (folders[0] / f"seed-{n:03d}").write_bytes(seed)
    quiet()
    # libFuzzer runs argv[0] through the shell for -merge and -fork: the command that runs
    # this target again.
    again = shlex.join([sys.executable, "-m", "dicom_listener.fuzz", name])
    atheris.Setup([again, *rest], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
