"""Reading a JSON request body safely: bounded size, JSON content type, bounded nesting, valid
Unicode. Every refusal is an `APIError` (413, 415, 400), decided before validation.

Why each check: the size limit is enforced while reading (a declared Content-Length over it is
refused unread), so a huge body costs no parsing; requiring a JSON content type means a web
page cannot start generations with a plain form post (which browsers send cross-origin without
asking); JSON nested deeper than any request needs is refused (Python's parser would recurse
itself to a RecursionError); lone UTF-16 surrogates (`"\\ud800"`, legal in JSON escapes) cannot
be encoded or tokenized and are refused with the field that holds them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from .errors import APIError, invalid_request

MAX_JSON_DEPTH = 32
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def too_large(limit: int) -> APIError:
    return APIError(f"Request body too large (limit {limit} bytes).", status_code=413,
                    type="invalid_request_error", code="body_too_large")


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, or an APIError."""
    if not is_json_content_type(request.headers.get("content-type")):
        raise APIError("Send the request body as JSON with 'Content-Type: application/json'.",
                       status_code=415, type="invalid_request_error",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except RecursionError as exc:
        raise invalid_request(f"The JSON body is nested too deeply (at most {MAX_JSON_DEPTH} "
                              "levels).", code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_request(f"We could not parse the JSON body of your request: {exc}. "
                              "Send a JSON object.", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise invalid_request(f"The JSON body is nested too deeply (at most {MAX_JSON_DEPTH} "
                              "levels).", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):   # cheap pre-filter: only escapes can make surrogates
        where = find_lone_surrogate(data)
        if where is not None:
            raise invalid_request(
                f"{where or 'The request'} contains a lone UTF-16 surrogate (an unpaired "
                "\\ud800-\\udfff escape); send valid Unicode text.", param=where or None,
                code="invalid_unicode")
    return data


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `[]` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return deepest


def find_lone_surrogate(value: Any) -> str | None:
    """Path (`messages[0].content`) of the first string, key included, holding a lone
    surrogate; None if there is none."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _encodes(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{key}" if path else str(key)
                if not _encodes(key):
                    return path
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
