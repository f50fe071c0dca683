"""The worker's timer pass over a study table holding a retention period of scored studies.

    .venv/bin/python bench/worker_timer_pass.py [--studies 700 3500] [--instances 38]
        [--passes 100]

Four times a second the worker's timer looks for studies to announce
(``WorkerFlow.release_ready_studies``). Scored studies stay in its table for
``SCANWATCH_WORKER_STUDY_RETENTION_S`` (a week): at 500 studies a day, 3 500 of them. This fills
a :class:`~inference_worker.study_store.StudyStore` (over a dict standing in for the Faust
table, as the store's tests do) with ``--studies`` scored studies of ``--instances`` each,
runs one pass (the first after a start or a rebalance reads every study), then times
``--passes`` more with ``time.process_time``. Printed: CPU per pass, and per second at four
passes a second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.benchmarks import say  # noqa: E402
from inference_worker.assembly import add_instance, mark_announced  # noqa: E402
from inference_worker.tests.test_worker_assembly import received  # noqa: E402
from inference_worker.tests.test_worker_study_store import store_world  # noqa: E402

PASSES_PER_S = 4  # the worker's check interval: 0.25 s


def pass_cpu_s(studies: int, instances: int, passes: int) -> float:
    world, _ = store_world()
    for s in range(studies):
        uid = f"1.2.826.0.1.3680043.8.498.{s}"
        state = None
        for n in range(instances):
            state = add_instance(state, received(n, study=uid), 1000.0)
        assert state is not None
        world.flow.studies[uid.encode()] = mark_announced(state, instances)

    async def run(count: int) -> None:
        for _ in range(count):
            await world.flow.release_ready_studies()

    asyncio.run(run(1))
    started = time.process_time()
    asyncio.run(run(passes))
    return (time.process_time() - started) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[700, 3500])
    parser.add_argument("--instances", type=int, default=38)
    parser.add_argument("--passes", type=int, default=100)
    args = parser.parse_args()
    say(f"load average {os.getloadavg()[0]:.1f}")
    for studies in args.studies:
        cpu = pass_cpu_s(studies, args.instances, args.passes)
        say(
            f"{studies} scored studies of {args.instances}: {cpu * 1000:.3f} ms CPU per pass, "
            f"{cpu * PASSES_PER_S * 1000:.1f} ms per second"
        )
    say(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
