"""Writes a study's FHIR resources in one FHIR ``transaction`` Bundle (``POST [base]``).

Ids are deterministic (:mod:`scanwatch.ids`), so a repeated write replaces instead of
duplicating: that is what makes redelivery harmless. Every entry of a transaction is written or
none is (the FHIR API's ``transactions``).

A result a clinician signed is never overwritten: an Observation or DiagnosticReport whose
current status is signed (:data:`scanwatch.clinical_review.SIGNED_STATUSES`) is left alone by a
redelivered or re-scored result of the same (study, model, version). A result that is the
stored one but for ``issued`` (the same study scored again after it was announced again) is not
written: it would be a new version that changes nothing.

Both rules are judged without a read before each write. Each entry of a signed type is
conditional on what the writer knows: the version it wrote last (``ifMatch``, remembered from
the ``transaction-response``), or, for one it never wrote, that none exists
(``ifNoneMatch: *``). A scored study's first write, and its heatmaps' write after it, are then
one request each. When the server answers 412 (a clinician signed meanwhile, or the study was
scored before this process started: a redelivery), nothing was written: the writer reads those
resources (concurrently), judges them as stored, and sends the transaction again on the
versions read, so a signature that lands in between fails it again (``ifMatch``).

When the FHIR API requires tokens, the writer is a registered backend client: it gets a bearer
token with the OAuth 2.0 client-credentials grant (HTTP Basic client authentication), keeps it
until shortly before it expires, and fetches a new one once if the API answers 401.

:meth:`FhirWriter.put` speaks HTTP and raises httpx's errors; :meth:`FhirWriter.put_all` and
:meth:`FhirWriter.put_missing` are the worker's :class:`~inference_worker.ports.ResourceWriter`
and turn the failures that may go away
by themselves (no connection, a timeout, 5xx, 429) into
:class:`~inference_worker.errors.FhirUnavailable`. Other answers (4xx: a refused token or
resource) go up unchanged: fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from inference_worker.errors import FhirUnavailable
from scanwatch.clinical_review import SIGNED_STATUSES

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
#: Renew a token this many seconds before the server says it expires.
TOKEN_MARGIN_S = 30.0
#: Types a clinician signs: written only while their current version is not signed.
SIGNED_TYPES = ("Observation", "DiagnosticReport")
#: Reads and conditional writes of one such resource before giving up (each 412 is a change
#: that landed in between).
CONDITIONAL_ATTEMPTS = 3
#: Elements a rescoring changes without changing the result: ``issued`` is the ready event's
#: time, and a study announced again (after a worker crash, a rebalance, a park) has a new one.
REISSUE_ONLY = frozenset({"issued"})


#: The parts of ``meta`` the server owns.
SERVER_META = frozenset({"versionId", "lastUpdated"})
#: Signed-type resources whose version and content the writer remembers, at most: two per
#: study, so the last 512 studies (what it is for: the study's heatmap write seconds after its
#: score, a redelivery soon after; a forgotten one costs a 412 and a read, never a wrong write).
KNOWN_LIMIT = 1024


@dataclass(frozen=True)
class Known:
    """A version this writer wrote or read (``etag``) and its content without server meta."""

    etag: str
    content: dict[str, Any]


def _key(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _signed_type(resource: dict[str, Any]) -> bool:
    return resource["resourceType"] in SIGNED_TYPES


def _etag(stored: dict[str, Any]) -> str:
    return f'W/"{stored["meta"]["versionId"]}"'


def _put_entry(base_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry that writes ``resource`` (update as create). Its ``fullUrl`` is the
    resource's absolute URL, which R4 asks of an entry whose resource holds relative
    references (they are resolved against it)."""
    key = _key(resource)
    return {
        "fullUrl": f"{base_url}/{key}",
        "resource": resource,
        "request": {"method": "PUT", "url": key},
    }


def _create_only(base_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry that writes ``resource`` only if it has no current version."""
    entry = _put_entry(base_url, resource)
    entry["request"]["ifNoneMatch"] = "*"
    return entry


def same_result(current: dict[str, Any], resource: dict[str, Any]) -> bool:
    """Whether ``resource`` says what the stored ``current`` says, but for when it was issued
    (the server's ``meta`` aside): writing it would only make a version that changes nothing
    (the fault suite counted such versions after a worker was killed: issue 19)."""
    ignored = REISSUE_ONLY | {"meta"}
    return {k: v for k, v in current.items() if k not in ignored} == {
        k: v for k, v in resource.items() if k not in ignored
    }


def token_url_for(base_url: str) -> str:
    """The API's token endpoint: ``https://host/fhir`` → ``https://host/auth/token``."""
    base = base_url.rstrip("/")
    return (base[: -len("/fhir")] if base.endswith("/fhir") else base) + "/auth/token"


class FhirWriter:
    """Async writer for one FHIR base URL."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 10.0,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if (client_id is None) != (client_secret is None):
            raise ValueError("give both client_id and client_secret, or neither")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._credentials = (
            (client_id, client_secret) if client_id and client_secret is not None else None
        )
        self.token_url = token_url or token_url_for(self.base_url)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._known: OrderedDict[str, Known] = OrderedDict()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # bound to the running loop, so made on first use
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s, headers={"Accept": FHIR_JSON}, transport=self._transport
            )
        return self._client

    async def _authorization(self, renew: bool = False) -> dict[str, str]:
        if self._credentials is None:
            return {}
        if renew or self._token is None or time.monotonic() >= self._token_expires:
            response = await self._http().post(
                self.token_url,
                data={"grant_type": "client_credentials"},
                auth=self._credentials,
            )
            response.raise_for_status()
            answer = response.json()
            self._token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in", 300))
            self._token_expires = time.monotonic() + max(lifetime - TOKEN_MARGIN_S, 1.0)
        return {"Authorization": f"Bearer {self._token}"}

    async def _request(
        self, method: str, url: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        headers = {"Content-Type": FHIR_JSON, **await self._authorization()}
        response = await self._http().request(method, url, json=body, headers=headers)
        if response.status_code == 401 and self._credentials is not None:
            # The token was revoked or the server's key rotated: one fresh token, one retry.
            headers.update(await self._authorization(renew=True))
            response = await self._http().request(method, url, json=body, headers=headers)
        return response

    def _url(self, resource: dict[str, Any]) -> str:
        return f"{self.base_url}/{resource['resourceType']}/{resource['id']}"

    async def put(self, resource: dict[str, Any]) -> None:
        """Create or update one resource; raises ``httpx.HTTPStatusError`` on a non-2xx answer."""
        (await self._request("PUT", self._url(resource), resource)).raise_for_status()

    async def put_all(self, resources: list[dict[str, Any]]) -> None:
        """Write ``resources`` in one transaction (referenced resources first), by the rules of
        :meth:`_entry`: a signed Observation or DiagnosticReport is left as the clinician signed
        it, the same result is not issued again, a concurrent change is read and judged again."""
        async with _domain_errors():
            current: dict[str, dict[str, Any] | None] | None = None
            for _attempt in range(CONDITIONAL_ATTEMPTS):
                planned = [(r, self._entry(r, current)) for r in resources]
                writes = [(resource, entry) for resource, entry in planned if entry is not None]
                if not writes:
                    return
                response = await self._transaction([entry for _r, entry in writes])
                if response.status_code == 412:
                    # A signed type changed since the writer knew it (or exists, unknown to it):
                    # read what is there now and judge again.
                    current = await self._read_all([r for r in resources if _signed_type(r)])
                    continue
                response.raise_for_status()
                self._remember(writes, response.json())
                for resource, entry in planned:
                    if entry is None and current is not None:
                        self._forget_or_keep(resource, current)
                return
        raise FhirUnavailable(
            f"a study's {', '.join(SIGNED_TYPES)} kept changing while being written"
        )

    def _entry(
        self, resource: dict[str, Any], current: dict[str, dict[str, Any] | None] | None
    ) -> dict[str, Any] | None:
        """The transaction entry that writes ``resource``, or None to leave what is stored.

        Other types are a plain ``PUT`` (update as create). A signed type is conditional:

        - read just now (``current``, after a 412): absent, written only if still absent
          (``ifNoneMatch: *``); signed or the same result, left alone; else written on the
          version read (``ifMatch``);
        - written by this writer before (its remembered version and content): the same result
          is sent again as it was stored, on that version (no new version; a 412 if it changed
          meanwhile); another result is written on that version;
        - unknown: written only if absent (``ifNoneMatch: *``; a 412 when it exists).
        """
        entry = _put_entry(self.base_url, resource)
        if not _signed_type(resource):
            return entry
        key = _key(resource)
        if current is not None:
            stored = current.get(key)
            if stored is None:
                entry["request"]["ifNoneMatch"] = "*"
            elif stored.get("status") in SIGNED_STATUSES:
                log.info(
                    "signed result left alone",
                    extra={"resourceType": resource["resourceType"], "id": resource["id"]},
                )
                return None
            elif same_result(stored, resource):
                return None  # the same result scored again: it stays as first issued
            else:
                entry["request"]["ifMatch"] = _etag(stored)
            return entry
        known = self._known.get(key)
        if known is None:
            entry["request"]["ifNoneMatch"] = "*"
        elif same_result(known.content, resource):
            entry["resource"] = known.content  # as stored: no new version, but checked
            entry["request"]["ifMatch"] = known.etag
        else:
            entry["request"]["ifMatch"] = known.etag
        return entry

    async def _transaction(self, entries: list[dict[str, Any]]) -> httpx.Response:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return await self._request("POST", self.base_url, bundle)

    async def _read_all(self, resources: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
        """The current version of each resource (None: absent or deleted), read concurrently."""
        answers = await asyncio.gather(*(self._request("GET", self._url(r)) for r in resources))
        found: dict[str, dict[str, Any] | None] = {}
        for resource, answer in zip(resources, answers, strict=True):
            if answer.status_code in (404, 410):
                found[_key(resource)] = None
            else:
                answer.raise_for_status()
                found[_key(resource)] = answer.json()
        return found

    def _remember(
        self, writes: list[tuple[dict[str, Any], dict[str, Any]]], answer: dict[str, Any]
    ) -> None:
        """Keep the version each signed type now has, with the content sent (what the server
        stores at that version), for the study's next write (its heatmaps, a redelivery)."""
        for (resource, entry), done in zip(writes, answer.get("entry") or [], strict=False):
            etag = (done.get("response") or {}).get("etag")
            if _signed_type(resource) and etag:
                self._keep(_key(resource), Known(str(etag), entry["resource"]))

    def _forget_or_keep(
        self, resource: dict[str, Any], current: dict[str, dict[str, Any] | None]
    ) -> None:
        """After leaving ``resource`` alone on a fresh read: an unsigned one is remembered at
        the version read (as stored, without the server's meta), a signed one forgotten."""
        key = _key(resource)
        stored = current.get(key)
        if stored is None or stored.get("status") in SIGNED_STATUSES:
            self._known.pop(key, None)
            return
        content = {k: v for k, v in stored.items() if k != "meta"}
        if meta := {k: v for k, v in (stored.get("meta") or {}).items() if k not in SERVER_META}:
            content["meta"] = meta
        self._keep(key, Known(_etag(stored), content))

    def _keep(self, key: str, known: Known) -> None:
        self._known[key] = known
        self._known.move_to_end(key)
        while len(self._known) > KNOWN_LIMIT:
            self._known.popitem(last=False)

    async def put_missing(self, resources: list[dict[str, Any]]) -> None:
        """Write, in order, those of ``resources`` the API holds no current version of (absent
        or deleted), in one transaction of ``ifNoneMatch: *`` entries; when one exists (412),
        read them all (concurrently) and write only the absent ones the same way."""
        async with _domain_errors():
            todo = resources
            for _attempt in range(CONDITIONAL_ATTEMPTS):
                if not todo:
                    return
                entries = [_create_only(self.base_url, resource) for resource in todo]
                response = await self._transaction(entries)
                if response.status_code != 412:
                    response.raise_for_status()
                    return
                current = await self._read_all(todo)
                todo = [r for r in todo if current[_key(r)] is None]
        raise FhirUnavailable("a study's registered resources kept changing while being written")

    async def close(self) -> None:
        """Close the HTTP connections (a later write opens new ones)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@contextlib.asynccontextmanager
async def _domain_errors() -> AsyncIterator[None]:
    """httpx's errors as the worker's: unreachable, 5xx and 429 are :class:`FhirUnavailable`
    (transient); any other refusal stays an ``HTTPStatusError`` (fatal)."""
    try:
        yield
    except httpx.TransportError as exc:
        raise FhirUnavailable(f"FHIR API unreachable: {exc!r}") from exc
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        if status >= 500 or status == 429:
            raise FhirUnavailable(f"FHIR API answered {status}") from exc
        raise
