"""API key check on /v1/*: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import unauthorized


class APIKeyMiddleware:
    """Guards /v1/* only (not /health, /metrics or the API docs)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._digest is not None and scope["type"] == "http":
            path = scope.get("path", "")
            if path == "/v1" or path.startswith("/v1/"):
                if not self._authorized(scope):
                    await unauthorized().response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                header = v
                break
        scheme, _, token = header.partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        # Both sides hashed to a fixed length: the comparison leaks neither content nor length.
        ok = hmac.compare_digest(given, self._digest)
        return ok and scheme.lower() == b"bearer"
