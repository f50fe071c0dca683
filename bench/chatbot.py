"""The patient chatbot's bars (issue 15): intent macro-F1 on held-out utterances, reply time of
result questions with concurrent conversations, and the memory of the Rasa server and the
action server.

1. ``rasa test nlu`` of the newest trained model on ``chatbot/tests/nlu_heldout.yml``
   (utterances written apart from the training data): the per-intent table and macro-F1.
2. The FHIR API (tokens required), the action server and the Rasa server started by the
   development stack on free ports; ``--conversations`` patients, each with three studies as the
   worker writes them, talk at once through the authenticated patient channel, each asking
   ``--rounds`` rounds of result questions (latest result, the one before, the trend, the
   status, the score). Every reply is timed from the POST to the whole answer: NLU, the policy,
   the action and its FHIR reads with the patient's token. The first round is warm-up.
3. VmRSS and VmHWM (peak) of the Rasa server's processes (its Sanic workers included) and of
   the action server after the run, and their proportional set size together.

    .venv/bin/python bench/chatbot.py --conversations 8 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools import chatbot_records  # noqa: E402
from devtools.benchmarks import percentile, say  # noqa: E402
from devtools.cli import dev_tokens  # noqa: E402
from devtools.kafka_local import free_port  # noqa: E402
from devtools.patients import RESULT_QUESTIONS, ask  # noqa: E402
from devtools.stack import Ports, Stack, StackConfig, StackError  # noqa: E402
from scanwatch import ids  # noqa: E402
from services.auth.scopes import parse_scopes  # noqa: E402

CHATBOT = ROOT / "chatbot"
MODELS = ROOT / "var" / "chatbot" / "models"


def newest_model() -> Path:
    return max(MODELS.glob("patient-*.tar.gz"), key=lambda p: p.stat().st_mtime)


def intent_table(model: Path, out: Path) -> tuple[str, float]:
    env = {**os.environ, "RASA_TELEMETRY_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(
        [
            str(ROOT / ".venv-rasa" / "bin" / "rasa"),
            "test",
            "nlu",
            "--nlu",
            "tests/nlu_heldout.yml",
            "--model",
            str(model),
            "--out",
            str(out),
        ],
        cwd=CHATBOT,
        env=env,
        check=True,
        capture_output=True,
    )
    report = json.loads((out / "intent_report.json").read_text())
    rows = sorted((k, v) for k, v in report.items() if isinstance(v, dict) and "support" in v)
    lines = [
        "| intent | precision | recall | F1 | held-out utterances |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in rows:
        if name.endswith(" avg"):
            continue
        lines.append(
            f"| `{name}` | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1-score']:.3f} "
            f"| {v['support']} |"
        )
    macro = report["macro avg"]
    lines.append(
        f"| **macro avg** | {macro['precision']:.3f} | {macro['recall']:.3f} | "
        f"**{macro['f1-score']:.3f}** | {macro['support']} |"
    )
    return "\n".join(lines), float(macro["f1-score"])


def family(pid: int) -> dict[int, tuple[int, float]]:
    """A process and its live descendants: pid -> (parent pid, user + system CPU seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    members: set[int] = set()
    grown = {pid}
    while grown:
        members |= grown
        grown = {child for child, (parent, _) in stats.items() if parent in grown} - members
    return {member: stats[member] for member in members if member in stats}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its live descendants, seconds."""
    return sum(cpu for _, cpu in family(pid).values())


def memory(pid: int) -> str:
    """The resident memory of a process and its descendants (the Rasa server's Sanic workers
    are forked children): each one's VmRSS and peak VmHWM, and their proportional set size
    together (pages the fork shares are counted once), MiB."""
    rows, pss = [], 0.0
    for member in sorted(family(pid)):
        status = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{member}/status").read_text().splitlines()
            if ":" in line
        )
        rss, peak = (int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
        rows.append(f"{rss:.0f} (peak {peak:.0f})")
        for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) / 1024
    return f"RSS {' + '.join(rows)} MiB, together PSS {pss:.0f} MiB"


def converse(
    stack: Stack, patient: str, rounds: int, times: list[float], lock: threading.Lock
) -> None:
    with httpx.Client(timeout=60) as client:
        for round_number in range(rounds):
            for question in RESULT_QUESTIONS:
                start = time.perf_counter()
                answer = ask(client, stack, patient, question)
                elapsed = time.perf_counter() - start
                answer.raise_for_status()
                assert "scan" in json.dumps(answer.json()), answer.text
                if round_number:  # round 0 warms up
                    with lock:
                        times.append(elapsed)


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--conversations", type=int, default=8)
    args.add_argument("--rounds", type=int, default=6)
    opts = args.parse_args()
    model = newest_model()

    with tempfile.TemporaryDirectory() as tmp:
        table, macro_f1 = intent_table(model, Path(tmp) / "nlu")
        config = StackConfig(
            var=Path(tmp),
            ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
            chatbot=True,
            chat_models=MODELS,
            only=("fhir-api", "chat-actions", "chat"),
            extra_env={"SCANWATCH_CHAT_RATE_BURST": "10000"},
        )
        stack = Stack(config)
        try:
            stack.start(timeout=300)
        except StackError:
            for log in sorted(stack.logs.glob("chat*.log")):  # the folder goes with the run
                sys.stderr.write(f"--- {log.name}\n{log.read_text()[-3000:]}\n")
            stack.stop()
            raise
        try:
            codes = [f"CHAT-BENCH-{n}" for n in range(opts.conversations)]
            patients = {
                code: chatbot_records.patient_records(
                    code, "Bench^Patient", ((1, 14, 0.22), (3, 11, 0.41), (5, 20, 0.71))
                )
                for code in codes
            }
            system = dev_tokens(config.var).issue("bench", parse_scopes("system/*.write"))[0]
            chatbot_records.seed(config.fhir_base, {"Authorization": f"Bearer {system}"}, patients)
            times: list[float] = []
            lock = threading.Lock()
            threads = [
                threading.Thread(
                    target=converse,
                    args=(
                        stack,
                        ids.patient_id(chatbot_records.ISSUER, code),
                        opts.rounds,
                        times,
                        lock,
                    ),
                )
                for code in codes
            ]
            pids = {
                name: stack.service(name).process.pid  # type: ignore[union-attr]
                for name in ("chat", "chat-actions", "fhir-api")
            }
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            own_before = time.process_time()
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            replies = opts.conversations * opts.rounds * len(RESULT_QUESTIONS)
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            cpu["bench client"] = time.process_time() - own_before
            rasa_memory = memory(stack.service("chat").process.pid)  # type: ignore[union-attr]
            actions_memory = memory(stack.service("chat-actions").process.pid)  # type: ignore[union-attr]
        finally:
            stack.stop()

    ms = [t * 1000 for t in times]
    say(f"model: {model.name}")
    say(f"held-out intent evaluation (rasa test nlu, tests/nlu_heldout.yml):\n\n{table}\n")
    say(f"intent macro-F1: {macro_f1:.3f} (bar >= 0.95)")
    say(
        f"reply time, {opts.conversations} concurrent conversations, {len(ms)} result questions "
        f"(after one warm-up round each): p50 {statistics.median(ms):.0f} ms, "
        f"p95 {percentile(ms, 95):.0f} ms, max {max(ms):.0f} ms (bar p95 <= 300 ms); "
        f"{replies / wall:.1f} replies/s over the run"
    )
    say(
        "CPU per reply: "
        + ", ".join(f"{name} {seconds / replies * 1000:.1f} ms" for name, seconds in cpu.items())
        + f" (2 cores give {2000 * wall / replies:.0f} ms of CPU per reply at this rate)"
    )
    say(f"memory: Rasa server (main process, then its workers) {rasa_memory}")
    say(f"memory: action server {actions_memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
