"""The Python blocks of README.md and docs/*.md, for the tests that run them and for `make lint`.

Every block is a complete program that runs as it is (no block is exempt).
`python tests/docs/examples.py DIR` writes each block to DIR as a module, so mypy can check
them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"```python\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the checkout
    index: int  # 1-based, within its document
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def module(self) -> str:
        return re.sub(r"\W", "_", f"{Path(self.doc).stem}_{self.index}").lower()


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks() -> list[Block]:
    found: list[Block] = []
    for path in documents():
        text = path.read_text(encoding="utf-8")
        for index, m in enumerate(_BLOCK.finditer(text), start=1):
            line = text.count("\n", 0, m.start("code"))
            found.append(Block(str(path.relative_to(ROOT)), index, line, m.group("code")))
    return found


def write_modules(target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for block in blocks():
        path = target / f"{block.module}.py"
        path.write_text(block.code, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_modules(Path(sys.argv[1])):
        print(path)
