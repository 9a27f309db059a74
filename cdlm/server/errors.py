"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server produces goes through `APIError` so that the status code, the error
`type` and the JSON body stay consistent. Bad input is always a 4xx, never a 500.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("cdlm.server")


class APIError(Exception):
    """An error that maps to one HTTP response with an OpenAI error body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = safe_text(message)
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = None if param is None else safe_text(param)
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)

    def sse(self) -> str:
        """The error as one Server-Sent-Events frame (for failures after streaming began)."""
        return f"data: {safe_json(self.body())}\n\n"


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone UTF-16 surrogates, which JSON escapes can
    smuggle into a request) replaced by U+FFFD, so an error that quotes the input encodes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def safe_json(obj: Any) -> str:
    """JSON text that always encodes to UTF-8 (non-ASCII kept when it can be)."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True)
    return text


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Constructors for the documented cases, so that call sites stay uniform.

def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, status_code=400, type="invalid_request_error", param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    msg = f"The parameter '{param}' is not supported by this server"
    msg += f": {detail}" if detail else "."
    return APIError(msg, status_code=400, type="invalid_request_error", param=param,
                    code="unsupported_parameter")


def unsupported_many(fields: list[tuple[str, str]]) -> APIError:
    """One 400 naming every unsupported field present (`param` is the first one)."""
    if len(fields) == 1:
        return unsupported(*fields[0])
    listed = "; ".join(f"'{name}'" + (f" ({why})" if why else "") for name, why in fields)
    return APIError(f"These parameters are not supported by this server: {listed}.",
                    status_code=400, type="invalid_request_error", param=fields[0][0],
                    code="unsupported_parameter")


def unauthorized() -> APIError:
    return APIError("Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    status_code=401, type="invalid_request_error", code="invalid_api_key")


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(f"The model '{model}' does not exist. Available: {', '.join(available)}.",
                    status_code=404, type="invalid_request_error", param="model",
                    code="model_not_found")


def queue_full(retry_after_s: float, detail: str = "") -> APIError:
    """429 with `Retry-After` (whole seconds, as HTTP defines it) and `retry-after-ms` (which
    the `openai` clients read first)."""
    msg = "The server is at capacity: the request queue is full. Retry later."
    if detail:
        msg += f" ({detail})"
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s))),
               "retry-after-ms": str(max(1, round(retry_after_s * 1000)))}
    return APIError(msg, status_code=429, type="rate_limit_exceeded", code="queue_full",
                    headers=headers)


def draining() -> APIError:
    return APIError("The server is shutting down and no longer accepts requests.",
                    status_code=503, type="service_unavailable", code="draining",
                    headers={"Retry-After": "1"})


def engine_dead(detail: str = "") -> APIError:
    msg = "The inference engine stopped; this server cannot serve requests."
    if detail:
        msg += f" Cause: {detail}"
    return APIError(msg, status_code=503, type="service_unavailable", code="engine_dead")


def internal_error(detail: str = "") -> APIError:
    msg = "The server failed to process this request."
    if detail:
        msg += f" {detail}"
    return APIError(msg, status_code=500, type="server_error", code="internal_error")


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """Turn pydantic's error list into one readable 400 (first error names the param)."""
    if not errors:
        return invalid_request("Invalid request.")
    parts = []
    for e in errors[:5]:
        param = _loc_to_param(e.get("loc", ()))
        msg = e.get("msg", "invalid value")
        if e.get("type") == "extra_forbidden":
            msg = "Unrecognized request argument supplied"
        parts.append(f"{param}: {msg}" if param else msg)
    first = errors[0]
    code = "unrecognized_argument" if first.get("type") == "extra_forbidden" else None
    return invalid_request("Invalid request: " + "; ".join(parts),
                           param=_loc_to_param(first.get("loc", ())), code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI clients expect 400 (vLLM does the same).
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        etype = {404: "not_found_error", 405: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        detail = exc.detail if isinstance(exc.detail, str) else safe_json(exc.detail)
        if status == 404:
            detail = f"Not found: {request.method} {request.url.path}"
        return APIError(detail, status_code=status, type=etype,
                        headers=dict(getattr(exc, "headers", None) or {})).response()

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error().response()
