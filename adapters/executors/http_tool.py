"""Call an HTTP API as a step: bounded, validated, and kept away from internal networks."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError
from rulebound.domain.errors import DefinitionError
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
# One pass over a template: ${ENV_VAR} (from the environment) or {field} (from the input),
# so that neither kind of value is ever read again as a placeholder.
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\{([A-Za-z_][A-Za-z0-9_.]*)\}")
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


def _secret(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ExecutorError(f"the secret {name} is not set", kind="client_error")
    return value


def _fill_text(template: str, values: Any, field: Callable[[str], str] = str) -> str:
    """${ENV_VAR} from the environment, as it is; {field} from the input, through `field`."""
    def fill(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return _secret(m.group(1))
        return field(str(_lookup(values, m.group(2)) or ""))

    return _PLACEHOLDER.sub(fill, template)


def _fill_json(template: Any, values: Any) -> Any:
    """Fill a JSON body template: "{x}" alone keeps x's type; inside text it is formatted;
    "${ENV_VAR}" is the environment variable's text, alone or inside text."""
    if isinstance(template, str):
        whole = _WHOLE.match(template)
        if whole:
            return _lookup(values, whole.group(1))
        return _fill_text(template, values)
    if isinstance(template, Mapping):
        return {k: _fill_json(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill_json(v, values) for v in template]
    return template


def _check_template(text: str, where: str) -> None:
    """A `$` before a `{` must start a well-formed ${ENV_VAR}: anything else would be sent
    as a stray `$` once its braces were read as an input field."""
    for m in re.finditer(r"\$\{[^}]*\}?", text):
        if not _ENV.fullmatch(m.group(0)):
            raise DefinitionError(f"HttpTool {where}: {m.group(0)!r} is not a ${{ENV_VAR}} "
                                  "placeholder (letters, digits and _, not starting with a "
                                  "digit)")


def _check_body(template: Any, where: str = "body") -> None:
    if isinstance(template, str):
        _check_template(template, where)
    elif isinstance(template, Mapping):
        for key, value in template.items():
            _check_body(value, f"{where}.{key}")
    elif isinstance(template, list):
        for i, value in enumerate(template):
            _check_body(value, f"{where}[{i}]")


class HttpTool(SessionUser):
    """An HTTP call as a step.

    url: a template; {field} placeholders are filled from the step input, URL-quoted, and
      ${ENV_VAR} placeholders from the environment at call time, as they are.
    headers: values may name secrets as ${ENV_VAR}, read from the environment at call time
      (never from the definition, never logged).
    body: a JSON template for POST/PUT/PATCH ("{field}" alone keeps the value's type;
      ${ENV_VAR} in a string is filled from the environment at call time).
    A `${` that does not start a well-formed ${ENV_VAR} is a DefinitionError, and an unset
    variable fails the attempt (not retryable) naming the variable, never its value.
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
        _check_template(url, "url")
        for name, value in (headers or {}).items():
            _check_template(value, f"header {name}")
        _check_body(body)
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


    def secret_values(self) -> list[str]:
        """Values of the ${ENV_VAR}s its templates name, for the engine to scrub from any
        message it stores."""
        texts = [self.url, *self.headers.values(), orjson.dumps(self.body).decode()]
        names = {m.group(1) for text in texts for m in _ENV.finditer(text)}
        return [v for name in sorted(names) if (v := os.environ.get(name))]

    def __repr__(self) -> str:
        return f"HttpTool({self.method} {urlsplit(self.url).netloc})"

    def session_factory(self) -> Any:
        return session_factory(self.guard)  # one guarded session per engine and allow-list

    def _headers(self) -> dict[str, str]:
        return {name: _ENV.sub(lambda m: _secret(m.group(1)), value)
                for name, value in self.headers.items()}

    async def __call__(self, task: Task) -> Result:
        values = task.input if isinstance(task.input, Mapping) else {"input": task.input}
        url = _fill_text(self.url, values, lambda text: quote(text, safe=""))
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
