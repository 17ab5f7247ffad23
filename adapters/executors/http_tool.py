"""Call an HTTP API as a step: bounded, validated, and kept away from internal networks."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError
from rulebound.engine.executor import ExecutorError, Result, Task

from .http_common import (
    SessionUser,
    attempt_seconds,
    parse_json,
    read_capped,
    status_error,
    transport_error,
)
from .ssrf import Guard, Refused, session_factory

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_.]*)\}$")
# The only headers a redirect carries to another origin: what describes the body and the
# answer wanted, and the key that lets the far side deduplicate. Every other header stays
# with the origin it was configured for: credentials, cookies, and any custom header, since a
# literal `X-Api-Key: sk-...` is as secret as one filled from ${ENV}.
CROSS_ORIGIN_HEADERS = frozenset({"content-type", "content-length", "accept", "accept-encoding",
                                  "user-agent", "idempotency-key"})


def _lookup(values: Any, path: str) -> Any:
    for part in path.split("."):
        values = values.get(part) if isinstance(values, Mapping) else None
    return values


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port); ValueError for a URL urlsplit cannot take apart (a port out of
    range, a broken IPv6 literal)."""
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or (
        443 if parts.scheme.lower() == "https" else 80)


def _fill_json(template: Any, values: Any) -> Any:
    """Fill a JSON body template: "{x}" alone keeps x's type; inside text it is formatted."""
    if isinstance(template, str):
        whole = _WHOLE.match(template)
        if whole:
            return _lookup(values, whole.group(1))
        return re.sub(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}",
                      lambda m: str(_lookup(values, m.group(1)) or ""), template)
    if isinstance(template, Mapping):
        return {k: _fill_json(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill_json(v, values) for v in template]
    return template


class HttpTool(SessionUser):
    """An HTTP call as a step.

    url: a template; {field} placeholders are filled from the step input, URL-quoted.
    headers: values may name secrets as ${ENV_VAR}, read from the environment at call time
      (never from the definition, never logged).
    body: a JSON template for POST/PUT/PATCH ("{field}" alone keeps the value's type).
    response: a pydantic model the JSON answer must match.
    max_bytes: the response size cap. follow_redirects: off by default; when on, each hop
      is checked again (at most max_redirects hops), and a hop to another origin carries
      only CROSS_ORIGIN_HEADERS (Content-Type, Accept, Idempotency-Key, ...): credentials,
      cookies and every custom header, secret-filled or literal, are dropped.
    allow: CIDRs or host names that may be reached although they are not public.
    """

    service = "http tool"

    def __init__(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                 body: Any = None, response: type[BaseModel] | None = None,
                 max_bytes: int = 1024 * 1024, follow_redirects: bool = False,
                 max_redirects: int = 3, allow: Iterable[str] = ()) -> None:
        self.method = method.upper()
        self.url = url
        self.headers = dict(headers or {})
        self.body = body
        self.response = response
        self.max_bytes = max_bytes
        self.follow_redirects = follow_redirects
        self.max_redirects = max_redirects
        self.guard = Guard(allow)
        self.session_key = ("http-tool", self.guard.key)

    def __repr__(self) -> str:
        return f"HttpTool({self.method} {urlsplit(self.url).netloc})"

    def session_factory(self) -> Any:
        return session_factory(self.guard)  # one guarded session per engine and allow-list

    def _headers(self) -> dict[str, str]:
        def secret(match: re.Match[str]) -> str:
            value = os.environ.get(match.group(1))
            if value is None:
                raise ExecutorError(f"the secret {match.group(1)} is not set",
                                    kind="client_error")
            return value

        return {name: _ENV.sub(secret, value) for name, value in self.headers.items()}

    async def __call__(self, task: Task) -> Result:
        values = task.input if isinstance(task.input, Mapping) else {"input": task.input}
        url = re.sub(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}",
                     lambda m: quote(str(_lookup(values, m.group(1)) or ""), safe=""), self.url)
        body = orjson.dumps(_fill_json(self.body, values)) if self.body is not None else None
        headers = {"Content-Type": "application/json", **self._headers()}
        headers.setdefault("Idempotency-Key", task.idempotency_key)
        method = self.method
        try:
            async with asyncio.timeout(attempt_seconds(task)):
                for _hop in range(self.max_redirects + 1):
                    host = urlsplit(url).hostname or ""
                    self.guard.check_host(host)
                    async with self._session().request(method, url, data=body, headers=headers,
                                                       allow_redirects=False) as response:
                        if 300 <= response.status < 400 and "Location" in response.headers:
                            if not self.follow_redirects:
                                raise ExecutorError(
                                    f"{self.service} was redirected ({response.status}) and "
                                    "redirects are off", kind="client_error")
                            try:
                                target = urljoin(url, response.headers["Location"])
                                elsewhere = _origin(target) != _origin(url)
                            except ValueError:  # e.g. a port out of range
                                raise ExecutorError(
                                    f"{self.service} was redirected to an invalid URL",
                                    kind="client_error", retryable=False) from None
                            if elsewhere:  # only the allow-listed headers leave the origin
                                headers = {k: v for k, v in headers.items()
                                           if k.lower() in CROSS_ORIGIN_HEADERS}
                            url = target
                            if response.status == 303:
                                method, body = "GET", None
                            continue
                        if response.status >= 300:
                            raise status_error(self.service, response.status,
                                               response.headers)
                        raw = await read_capped(response, self.max_bytes, self.service)
                        break
                else:
                    raise ExecutorError(f"{self.service}: more than {self.max_redirects} "
                                        "redirects", kind="client_error")
        except ExecutorError:
            raise
        except Refused as exc:
            raise ExecutorError(str(exc), kind="refused", retryable=False) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, Refused):
                raise ExecutorError(str(exc.os_error), kind="refused", retryable=False) from None
            raise transport_error(self.service, exc) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise transport_error(self.service, exc) from None
        if not raw:
            data: Any = None
        else:
            data = parse_json(raw, self.service)
        if self.response is not None:
            try:
                data = self.response.model_validate(data).model_dump(mode="json")
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first["loc"]) or "value"
                raise ExecutorError(f"the response does not match the schema: {where}: "
                                    f"{first['msg']}", kind="invalid_output",
                                    retryable=False) from None
        return Result(output=data)
