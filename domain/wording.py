"""Counts in messages, in the right number (the decider, explain and the audit use it)."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 retry`, `2 retries`, `0 events`: a count with its noun in the right number."""
    if n == 1:
        return f"{n} {noun}"
    if plural is None:
        plural = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" \
            else noun + "s"
    return f"{n} {plural}"
