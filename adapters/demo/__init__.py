"""The bundled demo: support-ticket triage over sample tickets (`rulebound demo`)."""

from .workflow import triage

__all__ = ["triage"]
