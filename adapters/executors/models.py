"""Model executors over aiohttp: OpenAI-compatible chat completions and Anthropic messages.

One bounded task per call: a prompt filled from the step input, structured output requested
with the JSON schema of the step's output model and validated (a mismatch may be repaired by
a bounded re-ask whose tokens count), `max_tokens` from what the decider granted, usage
turned into cost with a price table. Keys come from the environment or a provider callable,
never from the definition, and never appear in messages.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError

from domain.events import Usage
from engine.executor import ExecutorError, Result, Task

from .http_common import (
    DEFAULT_MAX_BYTES,
    SessionUser,
    fill,
    parse_json,
    read_capped,
    status_error,
    transport_error,
)

# USD per million tokens (input, output). Configure your own with `prices=`.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6), "claude-sonnet-4-5": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
}
SecretProvider = Callable[[], str | None]


class _ModelExecutor(SessionUser):
    service = "model"

    def __init__(self, *, model: str, base_url: str, api_key_env: str | None,
                 api_key: SecretProvider | None, prompt: str | None, system: str | None,
                 temperature: float | None, repairs: int, prices: Mapping[str, tuple[float,
                                                                                     float]],
                 default_price: tuple[float, float] | None, max_bytes: int,
                 default_max_tokens: int) -> None:
        if repairs < 0 or repairs > 5:
            raise ValueError("repairs must be between 0 and 5")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key_env = api_key_env
        self._api_key = api_key
        self.prompt = prompt
        self.system = system
        self.temperature = temperature
        self.repairs = repairs
        self.prices = {**DEFAULT_PRICES, **prices}
        self.default_price = default_price
        self.max_bytes = max_bytes
        self.default_max_tokens = default_max_tokens

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    def _key(self) -> str | None:
        if self._api_key is not None:
            return self._api_key()
        return os.environ.get(self._api_key_env) if self._api_key_env else None

    # --- one call ----------------------------------------------------------------------

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        price = self.prices.get(self.model, self.default_price)
        if price is None:
            return 0.0
        return round(tokens_in * price[0] / 1e6 + tokens_out * price[1] / 1e6, 10)

    async def __call__(self, task: Task) -> Result:
        config = task.config
        template = config.get("prompt", self.prompt)
        if not template:
            raise ExecutorError(f"step {task.step!r} has no prompt (config 'prompt')",
                                kind="client_error")
        values = task.input if isinstance(task.input, Mapping) else {"input": task.input}
        messages: list[dict[str, Any]] = [{"role": "user", "content": fill(template, values)}]
        schema = task.output_schema
        spent = Usage()
        for round_ in range(self.repairs + 1):
            text, structured, used = await self._ask(task, messages, schema)
            spent = Usage(tokens_in=spent.tokens_in + used[0],
                          tokens_out=spent.tokens_out + used[1],
                          cost=spent.cost + self._cost(*used))
            try:
                return Result(output=self._validate(text, structured, schema), usage=spent)
            except _Invalid as problem:
                over_budget = task.max_cost is not None and spent.cost >= task.max_cost
                if round_ == self.repairs or over_budget:
                    raise ExecutorError(f"output does not match the schema: {problem}",
                                        kind="invalid_output", retryable=True,
                                        usage=spent) from None
                messages = [*messages, {"role": "assistant", "content": text or ""},
                            {"role": "user", "content": "That reply does not match the "
                             f"required JSON schema ({problem}). Reply again with JSON "
                             "only, matching the schema exactly."}]
        raise AssertionError("unreachable")

    @staticmethod
    def _validate(text: str | None, structured: Any, schema: type[BaseModel] | None) -> Any:
        value = structured
        if value is None:
            if schema is None:
                try:
                    return orjson.loads(text or "")
                except orjson.JSONDecodeError:
                    return {"text": text}
            try:
                value = orjson.loads(text or "")
            except orjson.JSONDecodeError:
                raise _Invalid("the reply is not JSON") from None
        if schema is None:
            return value
        try:
            return schema.model_validate(value).model_dump(mode="json")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "value"
            raise _Invalid(f"{where}: {first['msg']}") from None

    async def _ask(self, task: Task, messages: list[dict[str, Any]],
                   schema: type[BaseModel] | None) -> tuple[str | None, Any, tuple[int, int]]:
        url, headers, body = self._request(task, messages, schema)
        remaining = max(0.001, task.timeout)
        try:
            async with asyncio.timeout(remaining):
                async with self._session().post(url, data=orjson.dumps(body),
                                                 headers=headers) as response:
                    if response.status >= 300:
                        raise status_error(self.service, response.status,
                                           response.reason or "", response.headers)
                    raw = await read_capped(response, self.max_bytes, self.service)
        except ExecutorError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise transport_error(self.service, exc) from None
        return self._parse(parse_json(raw, self.service))

    def _request(self, task: Task, messages: list[dict[str, Any]],
                 schema: type[BaseModel] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def _parse(self, data: Any) -> tuple[str | None, Any, tuple[int, int]]:
        raise NotImplementedError

    def _bad(self, what: str) -> ExecutorError:
        return ExecutorError(f"{self.service} answered without {what}", kind="bad_response",
                             retryable=True)


class _Invalid(Exception):
    pass


class OpenAIChat(_ModelExecutor):
    """OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, llama.cpp server, ...).

    Step config: prompt (template with {field} placeholders from the input), and optionally
    system, temperature. Keys: RULEBOUND_OPENAI_API_KEY / OPENAI_API_KEY by default.
    """

    service = "chat completions"

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str | None = "OPENAI_API_KEY",
                 api_key: SecretProvider | None = None, prompt: str | None = None,
                 system: str | None = None, temperature: float | None = 0.0,
                 repairs: int = 1, prices: Mapping[str, tuple[float, float]] | None = None,
                 default_price: tuple[float, float] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, default_max_tokens: int = 1024,
                 strict: bool = False) -> None:
        super().__init__(model=model, base_url=base_url, api_key_env=api_key_env,
                         api_key=api_key, prompt=prompt, system=system,
                         temperature=temperature, repairs=repairs, prices=prices or {},
                         default_price=default_price, max_bytes=max_bytes,
                         default_max_tokens=default_max_tokens)
        self.strict = strict

    @classmethod
    def from_env(cls) -> OpenAIChat:
        """RULEBOUND_OPENAI_BASE_URL, RULEBOUND_OPENAI_MODEL, RULEBOUND_OPENAI_API_KEY."""
        base = os.environ.get("RULEBOUND_OPENAI_BASE_URL", "https://api.openai.com/v1")
        key_env = ("RULEBOUND_OPENAI_API_KEY" if os.environ.get("RULEBOUND_OPENAI_API_KEY")
                   else "OPENAI_API_KEY")
        return cls(os.environ.get("RULEBOUND_OPENAI_MODEL", "gpt-4o-mini"), base_url=base,
                   api_key_env=key_env)

    def _request(self, task: Task, messages: list[dict[str, Any]],
                 schema: type[BaseModel] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        system = task.config.get("system", self.system)
        body: dict[str, Any] = {
            "model": task.config.get("model", self.model),
            "messages": ([{"role": "system", "content": system}] if system else []) + messages,
            "max_tokens": task.max_tokens or self.default_max_tokens,
        }
        temperature = task.config.get("temperature", self.temperature)
        if temperature is not None:
            body["temperature"] = temperature
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": schema.__name__, "schema": schema.model_json_schema(),
                "strict": self.strict}}
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return f"{self.base_url}/chat/completions", headers, body

    def _parse(self, data: Any) -> tuple[str | None, Any, tuple[int, int]]:
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("a message") from None
        usage = data.get("usage") or {}
        return text, None, (int(usage.get("prompt_tokens", 0)),
                            int(usage.get("completion_tokens", 0)))


class AnthropicMessages(_ModelExecutor):
    """Anthropic's Messages API; structured output through a forced tool call.

    Keys: ANTHROPIC_API_KEY by default (sent as x-api-key, never logged).
    """

    service = "anthropic messages"
    version = "2023-06-01"

    def __init__(self, model: str, *, base_url: str = "https://api.anthropic.com",
                 api_key_env: str | None = "ANTHROPIC_API_KEY",
                 api_key: SecretProvider | None = None, prompt: str | None = None,
                 system: str | None = None, temperature: float | None = 0.0,
                 repairs: int = 1, prices: Mapping[str, tuple[float, float]] | None = None,
                 default_price: tuple[float, float] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, default_max_tokens: int = 1024) -> None:
        super().__init__(model=model, base_url=base_url, api_key_env=api_key_env,
                         api_key=api_key, prompt=prompt, system=system,
                         temperature=temperature, repairs=repairs, prices=prices or {},
                         default_price=default_price, max_bytes=max_bytes,
                         default_max_tokens=default_max_tokens)

    def _request(self, task: Task, messages: list[dict[str, Any]],
                 schema: type[BaseModel] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {
            "model": task.config.get("model", self.model),
            "max_tokens": task.max_tokens or self.default_max_tokens,
            "messages": messages,
        }
        system = task.config.get("system", self.system)
        if system:
            body["system"] = system
        temperature = task.config.get("temperature", self.temperature)
        if temperature is not None:
            body["temperature"] = temperature
        if schema is not None:
            body["tools"] = [{"name": "respond", "description": "Give the answer.",
                              "input_schema": schema.model_json_schema()}]
            body["tool_choice"] = {"type": "tool", "name": "respond"}
        headers = {"Content-Type": "application/json", "anthropic-version": self.version}
        key = self._key()
        if key:
            headers["x-api-key"] = key
        return f"{self.base_url}/v1/messages", headers, body

    def _parse(self, data: Any) -> tuple[str | None, Any, tuple[int, int]]:
        try:
            blocks = data["content"]
            usage = data.get("usage") or {}
        except (KeyError, TypeError):
            raise self._bad("content") from None
        used = (int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)))
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                return orjson.dumps(block.get("input")).decode(), block.get("input"), used
        text = "".join(b.get("text", "") for b in blocks
                       if isinstance(b, dict) and b.get("type") == "text")
        return text, None, used
