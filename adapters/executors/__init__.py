"""Executors: functions, a scripted model, OpenAI-compatible and Anthropic models, HTTP tools."""

from .function import FunctionExecutor
from .http_tool import HttpTool
from .models import AnthropicMessages, OpenAIChat
from .scripted import Script, ScriptedModel

__all__ = ["AnthropicMessages", "FunctionExecutor", "HttpTool", "OpenAIChat", "Script",
           "ScriptedModel"]
