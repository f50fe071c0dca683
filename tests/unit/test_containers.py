"""The containers run as non-root with a read-only root filesystem (issue 19 point 5,
SECURITY.md "Containers"): there is no Docker engine here, so this reads docker-compose.yml and
the Dockerfile and checks, for every service, the user, the read-only root, the tmpfs /tmp,
the dropped capabilities and no-new-privileges; and that every path a service writes (its
settings' paths, from compose's environment or the setting's default) is a volume or a tmpfs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
#: Our images' user (Dockerfile): compose runs them as it.
APP_USER = "10001:10001"

#: Services whose root filesystem stays writable, and why (the rest: read_only).
WRITABLE_ROOT = {
    f"kafka-{node}": "the apache/kafka entrypoint renders its config into /opt/kafka/config "
    "at start"
    for node in (1, 2, 3)
}

#: Each of our services: its settings module and the settings that name paths
#: it only reads (everything else path-like must be writable).
SETTINGS = {
    "dicom-listener": (
        "dicom_listener.config",
        {"tls_cert_file", "tls_key_file", "tls_ca_file"},
    ),
    "topics": None,  # a one-shot topic creation: writes nothing
    "inference-worker": ("inference_worker.config", set()),
    "fhir-api": ("services.fhir_api.config", {"tls_cert_file", "tls_key_file"}),
    "portal": (
        "services.portal.config",
        {"assets_dir", "tls_cert_file", "tls_key_file"},
    ),
    "console": (
        "services.console.config",
        # the listener's store, the model registry and the training runs: read only here
        {"storage_dir", "model_repository", "jwks_file", "tls_cert_file", "tls_key_file"},
    ),
    "training-worker": ("training.config", {"init_from"}),
}
#: Paths a service writes that no setting of its own names.
ALSO_WRITES = {
    # heatmap series, into the store at the listener's paths (the events carry those)
    "inference-worker": ["${dicom-listener:SCANWATCH_LISTENER_STORAGE_DIR}"],
    "chat": ["${chat:SCANWATCH_CHAT_LOCK_DIR}"],
}
#: Settings any service only reads: certificates, keys and secrets mounted into it.
READ_ONLY_NAME = re.compile(r"^tls_|_(cert|key|ca)_file$|(token|secret|password)_file$")
PATH_NAME = re.compile(r"(_dir|_path|_file|_url|_repository|^repository)$")


def merged(service: str) -> dict:
    return SERVICES[service]


def env(service: str) -> dict[str, str]:
    environment = merged(service).get("environment") or {}
    if isinstance(environment, list):
        environment = dict(e.split("=", 1) for e in environment)
    return {k: str(v) for k, v in environment.items()}


def mounts(service: str) -> list[tuple[PurePosixPath, bool]]:
    """(target, writable) of each volume and tmpfs of a service."""
    found = []
    for volume in merged(service).get("volumes") or []:
        if isinstance(volume, dict):
            found.append((PurePosixPath(volume["target"]), not volume.get("read_only")))
            continue
        parts = volume.split(":")
        found.append((PurePosixPath(parts[1]), "ro" not in parts[2:]))
    tmpfs = merged(service).get("tmpfs") or []
    for target in [tmpfs] if isinstance(tmpfs, str) else tmpfs:
        found.append((PurePosixPath(target.split(":")[0]), True))
    return found


def writable(service: str, path: str) -> bool:
    candidate = PurePosixPath(path)
    return any(
        ok and (candidate == target or target in candidate.parents)
        for target, ok in mounts(service)
    )


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_is_hardened(service: str) -> None:
    spec = merged(service)
    user = str(spec.get("user", ""))
    assert user, f"{service}: no user (it would run as the image's, often root)"
    assert user.split(":")[0] not in ("0", "root"), f"{service} runs as root"
    assert "ALL" in (spec.get("cap_drop") or []), f"{service}: capabilities not dropped"
    assert "no-new-privileges:true" in (spec.get("security_opt") or []), service
    if service in WRITABLE_ROOT:
        assert spec.get("read_only") is False, f"{service}: listed as writable but read_only"
    else:
        assert spec.get("read_only") is True, f"{service}: root filesystem not read-only"
    assert writable(service, "/tmp"), f"{service}: /tmp is neither a tmpfs nor a volume"


@pytest.mark.parametrize("service", sorted(s for s in SERVICES if "build" in SERVICES[s]))
def test_our_images_run_as_their_unprivileged_user(service: str) -> None:
    target = SERVICES[service]["build"]["target"]
    stage = re.search(
        rf"^FROM \S+ AS {re.escape(target)}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S
    )
    assert stage, f"{service}: no Dockerfile stage {target}"
    users = re.findall(r"^USER (\S+)", stage.group(1), re.M)
    assert users and users[-1] == APP_USER, f"stage {target}: USER {users}"
    assert str(SERVICES[service]["user"]) == APP_USER, service


def test_the_image_user_exists_with_that_uid_and_gid() -> None:
    uid, gid = APP_USER.split(":")
    assert DOCKERFILE.count(f"groupadd --system --gid {gid} scanwatch") == 2  # base, chatbot
    assert DOCKERFILE.count(f"useradd --system --uid {uid} --gid {gid}") == 2


def expand(text: str) -> str:
    """``${service:VARIABLE}``: that service's compose environment value."""
    return re.sub(r"\$\{([\w-]+):(\w+)\}", lambda m: env(m.group(1)).get(m.group(2), ""), text)


def default_of(value: ast.expr | None) -> str | None:
    """A setting's default as written: ``Field("x")``, ``Field(default="x")``,
    ``Field(Path("x"))``, or a plain ``"x"``; None for anything else."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Field":
        given = [k.value for k in value.keywords if k.arg == "default"] or value.args[:1]
        value = given[0] if given else None
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Path":
        value = value.args[0] if value.args else None
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    return None


def ast_path_fields(module: str) -> dict[str, str | None]:
    """The path-like settings of a config module (paths, and URLs that may name an SQLite
    file), read without importing it (training's imports TensorFlow): name and default."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    fields: dict[str, str | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, annotation = node.target.id, ast.unparse(node.annotation)
            if "Path" in annotation or PATH_NAME.search(name):
                fields[name] = default_of(node.value)
    return fields


def written_paths(service: str) -> dict[str, str]:
    """Every path the service writes: its settings' path-like values (compose's environment,
    else the default; sqlite URLs by their file) less the ones it only reads, and
    :data:`ALSO_WRITES`."""
    entry = SETTINGS.get(service)
    paths: dict[str, str] = {}
    if entry is not None:
        module, read_only = entry
        text = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        prefix = re.search(r'env_prefix="(\w+)"', text)
        assert prefix, module
        for name, default in ast_path_fields(module).items():
            value = env(service).get(prefix.group(1) + name.upper(), default)
            if name in read_only or READ_ONLY_NAME.search(name) or value in (None, ""):
                continue
            if value.startswith("sqlite:"):
                value = value.split(":///", 1)[1]
            elif "://" in value:  # a server (PostgreSQL, Kafka, HTTP): not a path
                continue
            paths[name] = value
    for extra in ALSO_WRITES.get(service, []):
        paths[extra] = expand(extra)
    return paths


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_path_a_service_writes_is_a_volume_or_tmpfs(service: str) -> None:
    for what, path in written_paths(service).items():
        assert path, f"{service}: {what} is not set"
        assert PurePosixPath(path).is_absolute(), (
            f"{service}: {what} = {path!r} is relative to the read-only image: set it in compose"
        )
        assert writable(service, path), f"{service}: {what} = {path} is not on a volume or tmpfs"


def test_the_written_paths_are_found() -> None:
    """The path discovery above finds what each service is known to write (so that the test
    before it cannot pass by finding nothing)."""
    assert written_paths("dicom-listener")["storage_dir"] == "/data/store"
    assert written_paths("inference-worker")["data_dir"] == "/data/worker"
    assert written_paths("fhir-api")["signing_keys_file"] == "/data/auth/signing-keys.json"
    assert set(written_paths("console")) >= {"index_url", "audit_url"}
    assert set(written_paths("training-worker")) >= {"repository", "runs_dir", "cache_dir"}
    assert "storage_dir" not in written_paths("console")  # read only there
    assert not writable("console", "/data/store/x.dcm")


def test_a_read_only_mount_or_a_missing_volume_is_caught() -> None:
    """The checks fail where they should: a store mounted read-only, a path on no volume."""
    saved = SERVICES["inference-worker"]
    try:
        SERVICES["inference-worker"] = {**saved, "volumes": ["dicom-store:/data/store:ro"]}
        assert not writable("inference-worker", "/data/store/1.2/3.4/5.6.dcm")
        assert not writable("inference-worker", "/data/worker")
        assert writable("inference-worker", "/tmp/x")
    finally:
        SERVICES["inference-worker"] = saved


def test_models_are_read_only_where_they_are_only_read() -> None:
    for service in ("tf-serving", "console"):
        assert not writable(service, "/models/scanwatch/1"), service
    assert writable("training-worker", "/models/scanwatch/1")


def test_dockerfile_creates_each_written_folder_for_its_user() -> None:
    """A new named volume takes the owner of the image's folder: each /data folder a service
    writes must exist in its stage, owned by the image's user."""
    for service, paths in {s: written_paths(s) for s in SETTINGS if SETTINGS[s]}.items():
        target = SERVICES[service]["build"]["target"]
        stage = re.search(
            rf"^FROM \S+ AS {re.escape(target)}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S
        )
        assert stage, target
        for path in paths.values():
            volume = next(
                t
                for t, ok in mounts(service)
                if ok and (PurePosixPath(path) == t or t in PurePosixPath(path).parents)
            )
            if str(volume).startswith("/data/") and not str(volume).startswith("/tmp"):
                assert re.search(
                    rf"install -d[^\n]*-o 10001 -g 10001[^\n]*{re.escape(str(volume))}\b",
                    stage.group(1),
                ), f"stage {target} does not create {volume} for uid 10001"


def test_chat_lock_dir_is_in_tmp() -> None:
    assert env("chat")["SCANWATCH_CHAT_LOCK_DIR"].startswith("/tmp/")


def test_path_helper_reads_a_default(tmp_path: Path) -> None:
    fields = ast_path_fields("inference_worker.config")
    assert fields["data_dir"] == "var/worker"  # the default: relative, so compose must set it
