"""Patients as benchmarks drive them over plain HTTP: an account activated through the
activation page, a portal session signed in the way a browser would (SMART, through the
authorization server's pages), and messages to the chatbot's authenticated channel with the
patient's own token. ``bench/portal.py``, ``bench/chatbot.py`` and ``bench/soak.py`` use them.
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

import httpx

from devtools.browser import form_fields
from devtools.cli import PATIENT_SCOPES
from devtools.stack import Stack, dev_tokens
from scanwatch.database import make_engine
from services.auth import accounts
from services.auth.scopes import parse_scopes

#: The benches' patients' password (long enough for the account rules).
PASSWORD = "a long bench pass phrase 2026"
#: Result questions a patient asks the chatbot (latest result, the one before, the trend, the
#: status, the score); each reply mentions the scan.
RESULT_QUESTIONS = (
    "what did my scan show?",
    "and the one before that?",
    "how am I doing?",
    "has a doctor looked at my result yet?",
    "what does my score mean",
)


def activate(
    auth: str, engine_url: str, patient_id: str, username: str, password: str = PASSWORD
) -> None:
    """Invite the patient of FHIR ``patient_id`` (the account database at ``engine_url``) and
    create the account through the activation page of the authorization server at ``auth``."""
    engine = make_engine(engine_url)
    try:
        token = accounts.invite_patient(engine, patient_id)
    finally:
        engine.dispose()
    with httpx.Client(base_url=auth, timeout=60) as http:
        page = http.get(f"/auth/activate?{urlencode({'token': token})}")
        fields = form_fields(page.text)
        fields.update(username=username, password=password, password2=password, totp="")
        done = http.post("/auth/activate", data=fields)
        if "Your account is ready" not in done.text:
            raise RuntimeError(f"activation failed: HTTP {done.status_code}")


def portal_session(portal: str, username: str, password: str = PASSWORD) -> httpx.Client:
    """An HTTP client signed in to the portal at ``portal`` as ``username``: the portal's
    ``/login`` sends it to the authorization page, the credentials are posted there, and the
    redirect back to ``/callback`` starts the session (its cookie kept by the client). The
    caller closes the client."""
    client = httpx.Client(base_url=portal, timeout=60, follow_redirects=False)
    try:
        start = client.get("/login")
        if start.status_code != 303:
            raise RuntimeError(f"portal /login: HTTP {start.status_code}")
        authorize = start.headers["location"]
        page = client.get(authorize)
        fields = form_fields(page.text)
        fields.update(username=username, password=password, totp="", action="sign-in")
        target = urlsplit(authorize)
        answer = client.post(f"{target.scheme}://{target.netloc}{target.path}", data=fields)
        if answer.status_code != 302:
            raise RuntimeError(f"sign-in refused: HTTP {answer.status_code}")
        back = client.get(answer.headers["location"])
        if back.status_code != 303 or back.headers.get("location") != "/":
            raise RuntimeError(f"portal /callback: HTTP {back.status_code}")
    except BaseException:
        client.close()
        raise
    return client


def ask(client: httpx.Client, stack: Stack, patient_id: str, text: str) -> httpx.Response:
    """POST one message to the chatbot's patient channel as the Patient ``patient_id``, with a
    fresh patient token (tokens live 15 minutes)."""
    bearer = dev_tokens(stack.config.var).issue("bench", parse_scopes(PATIENT_SCOPES), patient_id)
    return client.post(
        stack.config.chat_url,
        json={"message": text},
        headers={"Authorization": f"Bearer {bearer[0]}"},
    )
