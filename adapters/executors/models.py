"""Model executors over aiohttp: OpenAI-compatible chat completions and Anthropic messages.

One bounded task per call: a prompt filled from the step input, structured output requested
with the JSON schema of the step's output model and validated (a mismatch may be repaired by
a bounded re-ask whose tokens count), usage turned into cost with a price table. Keys come
from the environment or a provider callable, never from the definition, and never appear in
messages.

The grant. A task carries `max_tokens` (the tokens the decider reserved for this attempt,
prompt and completion together, or None) and `max_cost` (the step's declared worst-case cost;
0 or None means none was declared). Every round of an attempt (the first ask and each repair)
is capped so that the attempt stays inside both: the completion cap of a round is what is
left of the token grant after the tokens already spent and the round's prompt (the reported
prompt tokens of the previous round plus what was added since; for the first round
`estimate_tokens` of the request, meant to be on the high side), and no more than the cost grant
leaves at the model's price. A round whose cap would fall under `min_completion_tokens` is
not sent: on the first round that is a non-retryable `budget` failure (the grant cannot pay
for the prompt), on a repair round the attempt fails with the schema error it already has.
Without a token grant each round's completion is capped at `default_max_tokens`. All rounds
share the attempt's time: the step's timeout, on the event loop's monotonic clock (see
`http_common.attempt_seconds`; the deadline, on the engine's clock, is the engine's to
enforce). Each round's usage is added to `task.spent` as soon as it is known, so an attempt
the engine cancels still records the rounds it paid for.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError
from rulebound.domain.errors import RuleboundError
from rulebound.domain.events import Usage
from rulebound.engine.executor import ExecutorError, Result, Task

from .http_common import (
    DEFAULT_MAX_BYTES,
    SessionUser,
    attempt_seconds,
    fill,
    parse_json,
    read_capped,
    status_error,
    transport_error,
)

# USD per million tokens (input, output). Configure your own with `prices=` or `price=`.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6), "claude-sonnet-4-5": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
}
SecretProvider = Callable[[], str | None]
Price = tuple[float, float]
PriceSpec = float | tuple[float, float]
_SNAPSHOT = re.compile(r"(.+)-(?:\d{4}-\d{2}-\d{2}|\d{8})")
# OpenAI's reasoning models take max_completion_tokens and no temperature but the default.
_REASONING = re.compile(r"^(?:openai/)?(?:o\d|gpt-5)")


class MissingPrice(RuleboundError, ValueError):
    """A model has no price: its cost would silently be $0. Pass `price=` (or `price=0`)."""


def _as_price(value: PriceSpec, what: str) -> Price:
    pair = (value, value) if isinstance(value, int | float) else tuple(value)
    if len(pair) != 2 or not all(isinstance(x, int | float) and math.isfinite(x) and x >= 0
                                 for x in pair):
        raise ValueError(f"{what} must be a non-negative number or a pair (input, output) "
                         "in USD per million tokens")
    return float(pair[0]), float(pair[1])


def estimate_tokens(value: Any) -> int:
    """A guess at the tokens of a request part (its JSON, or the text), without a tokenizer,
    meant to be on the high side: one token per three ASCII bytes (real tokenizers average
    nearer four for English and code), and for every other character one token per UTF-8
    byte after its first: 1 for accented Latin, Greek or Cyrillic, 2 for a CJK character, 3
    for an emoji. Common tokenizers spend one to two tokens per CJK character and one to three
    per emoji, so this is at or above them in those scripts too, where one token per three
    bytes (one per CJK character, 1.3 per emoji) undercounted. Still an estimate, not a
    bound: only one token per byte would be, for rare characters split into bytes."""
    raw = value.encode() if isinstance(value, str) else orjson.dumps(value)
    if raw.isascii():
        return -(-len(raw) // 3)
    chars = len(raw.decode())
    extra = len(raw) - chars  # the UTF-8 bytes after the first of each non-ASCII character
    ascii_bytes = chars - sum(1 for byte in raw if byte >= 0xC0)  # lead bytes: one a char
    return -(-ascii_bytes // 3) + extra


def _count(usage: Any, key: str) -> int:
    """A token count from a provider's usage object; anything but a count is 0 (unknown)."""
    value = usage.get(key) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _Ledger:
    """What an attempt has spent so far, over all its rounds."""

    def __init__(self) -> None:
        self.tokens_in = self.tokens_out = 0
        self.cost = 0.0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def add(self, tokens_in: int, tokens_out: int, price: Price) -> Usage:
        """Count one round; returns the round's own usage (for `task.spent`)."""
        cost = tokens_in * price[0] / 1e6 + tokens_out * price[1] / 1e6
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.cost = round(self.cost + cost, 10)
        return Usage(tokens_in=tokens_in, tokens_out=tokens_out, cost=round(cost, 12))

    def usage(self) -> Usage:
        return Usage(tokens_in=self.tokens_in, tokens_out=self.tokens_out, cost=self.cost)


class _ModelExecutor(SessionUser):
    service = "model"
    spends_tokens = True  # its steps must declare max_tokens (see Executor)

    def __init__(self, *, model: str, base_url: str, api_key_env: str | None,
                 api_key: SecretProvider | None, prompt: str | None, system: str | None,
                 temperature: float | Literal["auto"] | None, repairs: int,
                 price: PriceSpec | None, prices: Mapping[str, PriceSpec],
                 default_price: PriceSpec | None, max_bytes: int, default_max_tokens: int,
                 max_output_tokens: int | None, min_completion_tokens: int) -> None:
        if repairs < 0 or repairs > 5:
            raise ValueError("repairs must be between 0 and 5")
        if default_max_tokens < 1 or min_completion_tokens < 1:
            raise ValueError("default_max_tokens and min_completion_tokens must be at least 1")
        if max_output_tokens is not None and max_output_tokens < min_completion_tokens:
            raise ValueError("max_output_tokens must be at least min_completion_tokens")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key_env = api_key_env
        self._api_key = api_key
        self.prompt = prompt
        self.system = system
        self.temperature = temperature
        self.repairs = repairs
        self.prices: dict[str, Price] = {
            **DEFAULT_PRICES, **{m: _as_price(p, f"the price of {m!r}") for m, p in
                                 prices.items()}}
        if price is not None:
            self.prices[model] = _as_price(price, "price")
        self.default_price = (None if default_price is None
                              else _as_price(default_price, "default_price"))
        self.max_bytes = max_bytes
        self.default_max_tokens = default_max_tokens
        self.max_output_tokens = max_output_tokens
        self.min_completion_tokens = min_completion_tokens
        self.price_of(model)  # a model without a price is a configuration error, now

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    def secret_values(self) -> list[str]:
        """The API key, so the engine can scrub it from any message it stores."""
        key = self._key()
        return [key] if key else []

    def _key(self) -> str | None:
        if self._api_key is not None:
            return self._api_key()
        return os.environ.get(self._api_key_env) if self._api_key_env else None

    def price_of(self, model: str) -> Price:
        """USD per million tokens (input, output): the price table (a dated snapshot such as
        gpt-4o-2024-08-06 takes its model's price), else `default_price`, else an error."""
        price = self.prices.get(model)
        if price is None:
            snapshot = _SNAPSHOT.fullmatch(model)
            if snapshot:
                price = self.prices.get(snapshot.group(1))
        if price is None:
            price = self.default_price
        if price is None:
            raise MissingPrice(
                f"no price for model {model!r}: pass price=(input, output) in USD per million "
                "tokens, or price=0 if it really is free (a local model), or add it to prices=")
        return price

    # --- one attempt: a first ask and bounded repairs ------------------------------------

    def _completion_cap(self, task: Task, spent: _Ledger, prompt: int, price: Price) -> int:
        """The most a round may generate so the attempt stays inside its token and cost
        grants, given the round's (estimated) prompt tokens."""
        if task.max_tokens is None:
            cap = self.default_max_tokens
        else:
            cap = task.max_tokens - spent.tokens - prompt
        if task.max_cost:  # 0 or None: no cost grant declared, tokens bound the cost
            left = task.max_cost - spent.cost - prompt * price[0] / 1e6
            if price[1] > 0:
                cap = min(cap, math.floor(left / (price[1] / 1e6) + 1e-6))
            elif left < -1e-12:
                cap = 0
        if self.max_output_tokens is not None:
            cap = min(cap, self.max_output_tokens)
        return cap

    def _prompt_overhead(self, schema: type[BaseModel] | None) -> int:
        """Prompt tokens the provider adds that the request does not show."""
        return 0

    async def __call__(self, task: Task) -> Result:
        config = task.config
        template = config.get("prompt", self.prompt)
        if not template:
            raise ExecutorError(f"step {task.step!r} has no prompt (config 'prompt')",
                                kind="client_error")
        model = str(config.get("model", self.model))
        try:
            price = self.price_of(model)
        except MissingPrice as exc:
            raise ExecutorError(str(exc), kind="config", retryable=False) from None
        spent = _Ledger()
        try:
            async with asyncio.timeout(attempt_seconds(task)):
                return await self._rounds(task, model, price, template, spent)
        except ExecutorError as exc:
            if spent.tokens or spent.cost:  # every round spent so far counts
                exc.usage = Usage(tokens_in=spent.tokens_in + exc.usage.tokens_in,
                                  tokens_out=spent.tokens_out + exc.usage.tokens_out,
                                  cost=round(spent.cost + exc.usage.cost, 10))
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = transport_error(self.service, exc)
            error.usage = spent.usage()
            raise error from None

    async def _rounds(self, task: Task, model: str, price: Price, template: str,
                      spent: _Ledger) -> Result:
        values = task.input if isinstance(task.input, Mapping) else {"input": task.input}
        messages: list[dict[str, Any]] = [{"role": "user", "content": fill(template, values)}]
        schema = task.output_schema
        prompt = 0
        previous: tuple[int, bool] | None = None  # the last round's cap, and was it cut off
        problem: _Invalid | None = None
        for round_ in range(self.repairs + 1):
            url, headers, body = self._request(task, model, messages, schema)
            if round_ == 0:
                prompt = estimate_tokens(body) + self._prompt_overhead(schema)
            else:  # what the provider counted last time, the reply, and the re-ask
                prompt += estimate_tokens(messages[-1]["content"]) + 8
            cap = self._completion_cap(task, spent, prompt, price)
            if cap < self.min_completion_tokens:
                if problem is None:
                    raise ExecutorError(
                        f"the step's grant ({self._grant_text(task)}) cannot pay for a prompt "
                        f"of about {prompt} tokens and an answer", kind="budget",
                        retryable=False)
                raise self._invalid(problem, f"no repair: {self._grant_text(task)} granted, "
                                    "not enough left for another round")
            if previous is not None and problem is not None and previous[1] and (
                    cap <= previous[0]):
                raise self._invalid(problem, f"the reply was cut off at {previous[0]} "
                                    "tokens and a repair could not be given more")
            body[self._token_param(model)] = cap
            text, structured, used, cut = await self._ask(url, headers, body)
            if used == (0, 0):  # the server reported no usage: count our estimate
                used = (prompt, estimate_tokens(text or ""))
            # Reported before anything else is awaited: if the engine cancels the attempt
            # from here on (its deadline), what this round consumed is still recorded.
            task.spent.add(spent.add(*used, price))
            try:
                return Result(output=self._validate(text, structured, schema),
                              usage=spent.usage())
            except _Invalid as invalid:
                problem = invalid
            previous = (cap, cut)
            prompt = used[0] + used[1]
            messages = [*messages, {"role": "assistant", "content": text or ""},
                        {"role": "user", "content": "That reply does not match the "
                         f"required JSON schema ({problem}). Reply again with JSON "
                         "only, matching the schema exactly."}]
        assert problem is not None
        raise self._invalid(problem)

    @staticmethod
    def _grant_text(task: Task) -> str:
        parts = [f"{task.max_tokens} tokens" if task.max_tokens is not None else None,
                 f"${task.max_cost:g}" if task.max_cost else None]
        return ", ".join(p for p in parts if p) or "no grant"

    @staticmethod
    def _invalid(problem: _Invalid, note: str = "") -> ExecutorError:
        """The attempt's usage is added where every error of the attempt passes."""
        return ExecutorError(f"output does not match the schema: {problem}"
                             + (f" ({note})" if note else ""), kind="invalid_output",
                             retryable=True)

    def _token_param(self, model: str) -> str:
        return "max_tokens"

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

    async def _ask(self, url: str, headers: dict[str, str], body: dict[str, Any]
                   ) -> tuple[str | None, Any, tuple[int, int], bool]:
        """One round trip; the attempt's timeout surrounds every round."""
        try:
            async with self._session().post(url, data=orjson.dumps(body), headers=headers,
                                             allow_redirects=False) as response:
                if 300 <= response.status < 400:  # never re-sent: a hop would carry the key
                    raise ExecutorError(f"{self.service} answered {response.status} (a "
                                        "redirect; model endpoints are not followed: check "
                                        "base_url)", kind="client_error", retryable=False)
                if response.status >= 300:
                    raise status_error(self.service, response.status,
                                       response.headers)
                raw = await read_capped(response, self.max_bytes, self.service)
        except ExecutorError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise transport_error(self.service, exc) from None
        return self._parse(parse_json(raw, self.service))

    def _request(self, task: Task, model: str, messages: list[dict[str, Any]],
                 schema: type[BaseModel] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def _temperature(self, task: Task, model: str) -> float | None:
        value = task.config.get("temperature", self.temperature)
        if value == "auto":
            return None if _REASONING.match(model) else 0.0
        return value

    def _parse(self, data: Any) -> tuple[str | None, Any, tuple[int, int], bool]:
        raise NotImplementedError

    def _bad(self, what: str) -> ExecutorError:
        return ExecutorError(f"{self.service} answered without {what}", kind="bad_response",
                             retryable=True)


class _Invalid(Exception):
    pass


class OpenAIChat(_ModelExecutor):
    """OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, llama.cpp server, ...).

    Step config: prompt (template with {field} placeholders from the input), and optionally
    system, temperature, model. Keys: OPENAI_API_KEY by default.

    price: (input, output) USD per million tokens for `model` (0 for a free local model);
    required unless the model is in the price table (DEFAULT_PRICES, `prices=`) or a
    `default_price` is given: a model without a price raises MissingPrice here.
    token_param: the request field that caps the completion: "max_tokens" (what compatible
    servers know), "max_completion_tokens" (what OpenAI's reasoning models require), or
    "auto": max_completion_tokens for o1/o3/o4/gpt-5 models, max_tokens otherwise.
    temperature: "auto" sends 0.0, except to reasoning models, which take only their default.
    """

    service = "chat completions"

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str | None = "OPENAI_API_KEY",
                 api_key: SecretProvider | None = None, prompt: str | None = None,
                 system: str | None = None,
                 temperature: float | Literal["auto"] | None = "auto", repairs: int = 1,
                 price: PriceSpec | None = None, prices: Mapping[str, PriceSpec] | None = None,
                 default_price: PriceSpec | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 default_max_tokens: int = 1024, max_output_tokens: int | None = None,
                 min_completion_tokens: int = 16, strict: bool = False,
                 token_param: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto",
                 ) -> None:
        if token_param not in ("auto", "max_tokens", "max_completion_tokens"):
            raise ValueError("token_param must be 'auto', 'max_tokens' or "
                             "'max_completion_tokens'")
        super().__init__(model=model, base_url=base_url, api_key_env=api_key_env,
                         api_key=api_key, prompt=prompt, system=system,
                         temperature=temperature, repairs=repairs, price=price,
                         prices=prices or {}, default_price=default_price,
                         max_bytes=max_bytes, default_max_tokens=default_max_tokens,
                         max_output_tokens=max_output_tokens,
                         min_completion_tokens=min_completion_tokens)
        self.strict = strict
        self.token_param = token_param

    @classmethod
    def from_env(cls) -> OpenAIChat:
        """RULEBOUND_OPENAI_BASE_URL, RULEBOUND_OPENAI_MODEL, RULEBOUND_OPENAI_API_KEY, and
        RULEBOUND_OPENAI_PRICE ("0", or "input,output" USD per million tokens; needed for a
        model not in the price table), RULEBOUND_OPENAI_TOKEN_PARAM."""
        base = os.environ.get("RULEBOUND_OPENAI_BASE_URL", "https://api.openai.com/v1")
        key_env = ("RULEBOUND_OPENAI_API_KEY" if os.environ.get("RULEBOUND_OPENAI_API_KEY")
                   else "OPENAI_API_KEY")
        raw = os.environ.get("RULEBOUND_OPENAI_PRICE", "").strip()
        price: PriceSpec | None = None
        if raw:
            try:
                parts = [float(x) for x in raw.split(",")]
            except ValueError:
                parts = []
            if len(parts) not in (1, 2):
                raise ValueError("RULEBOUND_OPENAI_PRICE must be a number or 'input,output' "
                                 "in USD per million tokens")
            price = parts[0] if len(parts) == 1 else (parts[0], parts[1])
        token_param = os.environ.get("RULEBOUND_OPENAI_TOKEN_PARAM", "auto")
        return cls(os.environ.get("RULEBOUND_OPENAI_MODEL", "gpt-4o-mini"), base_url=base,
                   api_key_env=key_env, price=price,
                   token_param=token_param)  # type: ignore[arg-type]

    def _token_param(self, model: str) -> str:
        if self.token_param == "auto":
            return "max_completion_tokens" if _REASONING.match(model) else "max_tokens"
        return self.token_param

    def _request(self, task: Task, model: str, messages: list[dict[str, Any]],
                 schema: type[BaseModel] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        system = task.config.get("system", self.system)
        body: dict[str, Any] = {
            "model": model,
            "messages": ([{"role": "system", "content": system}] if system else []) + messages,
        }
        temperature = self._temperature(task, model)
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

    def _parse(self, data: Any) -> tuple[str | None, Any, tuple[int, int], bool]:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("a message") from None
        usage = data.get("usage")
        return text, None, (_count(usage, "prompt_tokens"), _count(usage, "completion_tokens")), \
            isinstance(choice, dict) and choice.get("finish_reason") == "length"


class AnthropicMessages(_ModelExecutor):
    """Anthropic's Messages API; structured output through a forced tool call.

    Keys: ANTHROPIC_API_KEY by default (sent as x-api-key, never logged). Prices as for
    OpenAIChat. A forced tool call makes Anthropic add a tool-use system prompt the request
    does not show: `tool_prompt_tokens` (350) are counted into the first round's estimate.
    """

    service = "anthropic messages"
    version = "2023-06-01"
    tool_prompt_tokens = 350

    def __init__(self, model: str, *, base_url: str = "https://api.anthropic.com",
                 api_key_env: str | None = "ANTHROPIC_API_KEY",
                 api_key: SecretProvider | None = None, prompt: str | None = None,
                 system: str | None = None, temperature: float | None = 0.0,
                 repairs: int = 1, price: PriceSpec | None = None,
                 prices: Mapping[str, PriceSpec] | None = None,
                 default_price: PriceSpec | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 default_max_tokens: int = 1024, max_output_tokens: int | None = None,
                 min_completion_tokens: int = 16) -> None:
        super().__init__(model=model, base_url=base_url, api_key_env=api_key_env,
                         api_key=api_key, prompt=prompt, system=system,
                         temperature=temperature, repairs=repairs, price=price,
                         prices=prices or {}, default_price=default_price,
                         max_bytes=max_bytes, default_max_tokens=default_max_tokens,
                         max_output_tokens=max_output_tokens,
                         min_completion_tokens=min_completion_tokens)

    def _prompt_overhead(self, schema: type[BaseModel] | None) -> int:
        return self.tool_prompt_tokens if schema is not None else 0

    def _request(self, task: Task, model: str, messages: list[dict[str, Any]],
                 schema: type[BaseModel] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {"model": model, "messages": messages}
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

    def _parse(self, data: Any) -> tuple[str | None, Any, tuple[int, int], bool]:
        try:
            blocks = data["content"]
            usage = data.get("usage")
        except (KeyError, TypeError, AttributeError):
            raise self._bad("content") from None
        used = (_count(usage, "input_tokens"), _count(usage, "output_tokens"))
        cut = data.get("stop_reason") == "max_tokens"
        if not isinstance(blocks, list):
            raise self._bad("content")
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                return orjson.dumps(block.get("input")).decode(), block.get("input"), used, cut
        text = "".join(b.get("text", "") for b in blocks
                       if isinstance(b, dict) and b.get("type") == "text")
        return text, None, used, cut
