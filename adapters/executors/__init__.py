"""Executors: functions, a scripted model, OpenAI-compatible and Anthropic models, HTTP tools.

Names are imported on first use: the model and HTTP executors bring aiohttp, which a
program (or a CLI command) that uses only the scripted model or functions never pays for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "FunctionExecutor": ".function",
    "HttpTool": ".http_tool",
    "AnthropicMessages": ".models",
    "OpenAIChat": ".models",
    "Script": ".scripted",
    "ScriptedModel": ".scripted",
}

__all__ = ["AnthropicMessages", "FunctionExecutor", "HttpTool", "OpenAIChat", "Script",
           "ScriptedModel"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .function import FunctionExecutor
    from .http_tool import HttpTool
    from .models import AnthropicMessages, OpenAIChat
    from .scripted import Script, ScriptedModel
