"""FastAPI dependencies of the auth routes: what they need, read from ``request.app.state``
(set by the app factory that includes :data:`services.auth.routes.router`). They are
``async``: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per request.

- ``tokens``: the :class:`~services.auth.tokens.TokenService`, or None when authorization is off;
- ``client_engine``: the engine of the database holding the registered clients;
- ``smart_server``: the :class:`~services.auth.server.SmartServer` (sign-in, authorization
  code, refresh, revocation), or None when authorization is off;
- ``auth_settings``: the :class:`~services.auth.config.AuthSettings`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine

from services.auth.config import AuthSettings
from services.auth.server import SmartServer
from services.auth.tokens import TokenService


async def get_tokens(request: Request) -> TokenService | None:
    tokens: TokenService | None = request.app.state.tokens
    return tokens


async def get_client_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.client_engine
    return engine


async def get_smart_server(request: Request) -> SmartServer | None:
    server: SmartServer | None = request.app.state.smart_server
    return server


async def get_auth_settings(request: Request) -> AuthSettings:
    settings: AuthSettings = request.app.state.auth_settings
    return settings


Tokens = Annotated[TokenService | None, Depends(get_tokens)]
ClientEngine = Annotated[Engine, Depends(get_client_engine)]
SmartServerDep = Annotated[SmartServer | None, Depends(get_smart_server)]
AuthSettingsDep = Annotated[AuthSettings, Depends(get_auth_settings)]
