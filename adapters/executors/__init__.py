"""Executors: functions, a scripted model, OpenAI-compatible and Anthropic models, HTTP tools.

Names are imported on first use: the model and HTTP executors bring aiohttp, which a
program (or a CLI command) that uses only the scripted model or functions never pays for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rulebound._lazy import lazy_names

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


__getattr__ = lazy_names(__name__, _HOMES)


if TYPE_CHECKING:
    from .function import FunctionExecutor
    from .http_tool import HttpTool
    from .models import AnthropicMessages, OpenAIChat
    from .scripted import Script, ScriptedModel
