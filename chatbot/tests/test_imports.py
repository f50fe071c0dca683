"""What the chatbot may import from the rest of scanwatch (ARCHITECTURE.md): only plain
modules that run in its own virtualenv. import-linter checks the main packages; the chatbot's
modules (``actions``, ``connectors``) are not importable there, so this test reads them."""

from __future__ import annotations

import ast

from train import PROJECT

ALLOWED = {
    "scanwatch.ids",
    "scanwatch.fhir_codes",
    "scanwatch.care_plan",
    "scanwatch.patient_records",
    "services.auth.scopes",
    "services.auth.tokens",
    "services.auth.jwks",
}


def test_the_chatbot_imports_only_plain_modules_of_scanwatch() -> None:
    found: dict[str, str] = {}
    for path in sorted((PROJECT / "actions").glob("*.py")) + sorted(
        (PROJECT / "connectors").glob("*.py")
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                names += [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("scanwatch", "services", "inference_worker", "devtools"):
                    found.setdefault(name, path.name)
    modules = {n for n in found if n in ALLOWED or n.rsplit(".", 1)[0] in ALLOWED}
    assert modules and set(found) == modules, {n: found[n] for n in set(found) - modules}
