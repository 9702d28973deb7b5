"""What every router needs: the stores, the settings, and the two access rules (reads and writes).

Reads are open unless ``KDWATCH_API_READ_TOKEN_REQUIRED`` is set; every write needs the bearer API
key (``KDWATCH_API_KEY``), compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel

from kdwatch.collector.contract import parse_ts
from kdwatch.errors import ContractError
from kdwatch.slo.config import SloFile, parse_slo_file
from kdwatch.storage.jobs import JobStore
from kdwatch.storage.slo_store import SloSqlStore
from kdwatch.storage.sql import SqlStore

MAX_BODY_BYTES = 32 * 1024 * 1024  # a reference baseline upload is the largest body


class ApiSettings(BaseModel):
    api_key: str | None = None
    read_token_required: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    cache_ttl_s: float = 1.0


@dataclass
class ApiContext:
    """The app's collaborators, kept on ``app.state.context`` and handed to each endpoint."""

    store: SqlStore
    slo_store: SloSqlStore
    jobs: JobStore
    settings: ApiSettings
    readiness: Callable[[], dict[str, str]] | None = None

    def slo_file(self) -> SloFile:
        """The stored SLO document, parsed (empty when none is stored)."""
        return parse_slo_file(self.slo_store.get_slo_document() or {})


async def _context(request: Request) -> ApiContext:
    # Async (no I/O): FastAPI would otherwise hop to its thread pool for every request just to run it.
    context: ApiContext = request.app.state.context
    return context


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:] if header.lower().startswith("bearer ") else None


async def require_key(request: Request) -> None:
    """Writes: the bearer API key, compared in constant time."""
    settings: ApiSettings = request.app.state.context.settings
    if settings.api_key is None:
        raise HTTPException(403, "writes are disabled: set KDWATCH_API_KEY")
    token = _bearer(request)
    if token is None or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise HTTPException(401, "a valid bearer API key is required", headers={"WWW-Authenticate": "Bearer"})


async def require_read(request: Request) -> None:
    """Reads: open, unless the deployment requires the key for them too."""
    if request.app.state.context.settings.read_token_required:
        await require_key(request)


def parse_time(value: str | None, name: str) -> int | None:
    """Query-string time: RFC 3339 or epoch milliseconds, within the contract's years (2000-2099)."""
    if value is None:
        return None
    try:
        return parse_ts(int(value) if value.isascii() and value.isdigit() else value, name)
    except ContractError:
        # The input is not echoed back: an error body never reflects what the caller sent.
        raise HTTPException(422, f"{name} must be RFC 3339 or epoch milliseconds in 2000-2099") from None


# Module level, so FastAPI can resolve them from the (postponed) annotations.
Context = Annotated[ApiContext, Depends(_context)]
Read = Annotated[None, Depends(require_read)]
Write = Annotated[None, Depends(require_key)]
