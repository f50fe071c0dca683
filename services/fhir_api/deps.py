"""FastAPI dependencies of the FHIR routes (``Annotated[..., Depends]`` types, as in
fastapi/full-stack-fastapi-template's ``api/deps.py``).

State comes from ``request.app.state``, set by the app factory: ``settings``, ``store``,
``tokens`` (None: authorization off), ``subscriptions``. The checks every route shares run
here, in the order a route declares them: content negotiation and the token
(:data:`GrantDep`, 406 then 401), the resource type (:data:`ResourceType`, 404), the id
(:data:`ResourceId`, 400), then the scope (:data:`ReadRule` / :data:`CreateRule` /
:data:`WriteAccess`, 403).

Every dependency is ``async``: FastAPI runs a plain ``def`` dependency in a worker thread,
one thread hop each per request; these only compute.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

from services.auth.scopes import OPEN_GRANT, READ, Grant
from services.auth.tokens import TokenService, bearer_token
from services.fhir_api.audit import Audit
from services.fhir_api.compartment import (
    Compartment,
    compartment_of,
    create_rule,
    refuse_patient_write,
)
from services.fhir_api.config import Settings
from services.fhir_api.errors import INVALID, NOT_FOUND, NOT_SUPPORTED, FhirError
from services.fhir_api.resources import ID_RE, RESOURCE_TYPES
from services.fhir_api.store import ResourceStore
from services.fhir_api.subscriptions import SubscriptionManager
from services.fhir_api.wire import JSON_MEDIA_TYPES

ACCEPTABLE = (*JSON_MEDIA_TYPES, "*/*", "application/*")
FORMATS = ("json", *JSON_MEDIA_TYPES)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ResourceStore:
    store: ResourceStore = request.app.state.store
    return store


async def get_subscriptions(request: Request) -> SubscriptionManager:
    subscriptions: SubscriptionManager = request.app.state.subscriptions
    return subscriptions


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ResourceStore, Depends(get_store)]
SubscriptionsDep = Annotated[SubscriptionManager, Depends(get_subscriptions)]


def negotiate(request: Request) -> None:
    """406 unless the client accepts FHIR JSON (``Accept`` or ``_format``)."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt not in FORMATS:
        raise FhirError(406, f"_format {fmt[:40]!r} is not supported; use json", NOT_SUPPORTED)
    accept = request.headers.get("accept")
    if fmt is None and accept:
        types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
        if not any(t in ACCEPTABLE for t in types):
            raise FhirError(
                406, "this server answers application/fhir+json only (Accept)", NOT_SUPPORTED
            )


async def negotiated(request: Request) -> None:
    negotiate(request)


async def get_grant(request: Request) -> Grant:
    """Content negotiation (406), then the bearer token's grant (401), or the open grant when
    authorization is off."""
    negotiate(request)
    tokens: TokenService | None = request.app.state.tokens
    if tokens is None:
        return OPEN_GRANT
    return tokens.verify(bearer_token(request.headers.get("authorization")))


GrantDep = Annotated[Grant, Depends(get_grant)]


def _is_fhir_resource(name: str) -> bool:
    try:
        model = get_fhir_model_class(name)
    except (ValueError, KeyError, AttributeError):
        return False
    return isinstance(model, type) and issubclass(model, Resource)


def check_type(resource_type: str) -> None:
    """404 for a resource type this server does not store (saying whether FHIR knows it)."""
    if resource_type in RESOURCE_TYPES:
        return
    names = ", ".join(RESOURCE_TYPES)
    if len(resource_type) <= 64 and resource_type.isalpha() and _is_fhir_resource(resource_type):
        raise FhirError(
            404,
            f"resource type {resource_type} is not supported by this server (supported: {names})",
            NOT_SUPPORTED,
        )
    raise FhirError(
        404, f"unknown resource type {resource_type[:64]!r} (supported: {names})", NOT_FOUND
    )


async def supported_type(resource_type: str) -> str:
    check_type(resource_type)
    return resource_type


async def valid_id(resource_id: str) -> str:
    if not ID_RE.match(resource_id):
        raise FhirError(400, f"{resource_id[:80]!r} is not a valid FHIR id", INVALID)
    return resource_id


ResourceType = Annotated[str, Depends(supported_type)]
ResourceId = Annotated[str, Depends(valid_id)]


async def read_rule(grant: GrantDep, resource_type: ResourceType) -> Compartment | None:
    """403 unless the grant may read the type; then the compartment its reads are limited to
    (None: unrestricted)."""
    return compartment_of(grant, resource_type, READ)


async def create_access(grant: GrantDep, resource_type: ResourceType) -> Compartment | None:
    """403 unless the grant may create the type; then the compartment a patient-bound create
    must stay in (None: unrestricted; ``compartment.create_rule``)."""
    return create_rule(grant, resource_type)


async def write_access(grant: GrantDep, resource_type: ResourceType) -> Grant:
    """403 unless the grant may write the type unrestricted (update, delete: patient-bound
    tokens never do)."""
    refuse_patient_write(grant, resource_type)
    return grant


ReadRule = Annotated[Compartment | None, Depends(read_rule)]
CreateRule = Annotated[Compartment | None, Depends(create_access)]
WriteAccess = Annotated[Grant, Depends(write_access)]


async def base_url(request: Request, settings: SettingsDep) -> str:
    """The public FHIR base URL: ``settings.base_url``, or derived from the request."""
    return settings.base_url or f"{str(request.base_url).rstrip('/')}/fhir"


async def get_audit(
    request: Request, grant: GrantDep, settings: SettingsDep, store: StoreDep
) -> Audit:
    return Audit(store, grant, request.query_params, settings.audit_reads)


BaseUrl = Annotated[str, Depends(base_url)]
AuditDep = Annotated[Audit, Depends(get_audit)]
