"""Write the JSON Schema snapshots of every event to ``schemas/jsonschema/<name>.json``.

``python -m schemas.export`` writes snapshots for new schema names only: a published version
never changes, so an existing snapshot is never overwritten (``--check`` only compares).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas import EVENT_TYPES
from schemas.events import Event

SNAPSHOTS = Path(__file__).resolve().parent / "jsonschema"


def json_schema(event_type: type[Event]) -> dict[str, Any]:
    """The JSON Schema of an event's wire form, with its name as ``$id``."""
    schema = event_type.model_json_schema(mode="serialization")
    return {"$id": event_type.SCHEMA, **schema}


def render(event_type: type[Event]) -> str:
    return json.dumps(json_schema(event_type), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--check", action="store_true", help="only report differences")
    opts = args.parse_args(argv)
    status = 0
    for event_type in EVENT_TYPES:
        path = SNAPSHOTS / f"{event_type.SCHEMA}.json"
        if not path.exists():
            if opts.check:
                sys.stderr.write(f"missing snapshot {path.name}\n")
                status = 1
            else:
                path.write_text(render(event_type))
                sys.stderr.write(f"wrote {path.name}\n")
        elif path.read_text() != render(event_type):
            sys.stderr.write(
                f"{event_type.SCHEMA} differs from its published snapshot: publish a new "
                f"version (v<N+1>) instead of changing it\n"
            )
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
