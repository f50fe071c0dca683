"""FastAPI dependencies of the auth routes: what they need, read from ``request.app.state``
(set by the app factory that includes :data:`services.auth.routes.router`). They are
``async``: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per request.

- ``tokens``: the :class:`~services.auth.tokens.TokenService`, or None when authorization is off;
- ``client_engine``: the engine of the database holding the registered clients.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine

from services.auth.tokens import TokenService


async def get_tokens(request: Request) -> TokenService | None:
    tokens: TokenService | None = request.app.state.tokens
    return tokens


async def get_client_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.client_engine
    return engine


Tokens = Annotated[TokenService | None, Depends(get_tokens)]
ClientEngine = Annotated[Engine, Depends(get_client_engine)]
