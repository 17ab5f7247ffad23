"""The command starts fast because it imports only what a command uses: checked by what a
fresh interpreter has imported (stable, unlike timings on a shared machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("aiohttp", "psycopg", "psycopg_pool", "pydantic", "rulebound.engine.engine",
         "rulebound.domain.definitions", "rulebound.adapters.executors.http_tool")


def _imported(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_cli_module_and_help_import_no_engine_no_pydantic_no_drivers() -> None:
    loaded = _imported("import rulebound.adapters.cli")
    assert not loaded & set(HEAVY)
    helped = _imported("from rulebound.adapters.cli import build_parser\n"
                       "try:\n    build_parser().parse_args(['--help'])\n"
                       "except SystemExit:\n    pass")
    assert not helped & set(HEAVY)


def test_listing_runs_on_sqlite_imports_no_http_client_and_no_postgres_driver(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    loaded = _imported("from rulebound.adapters.stores import open_store\n"
                       f"open_store({url!r}).close()\n"
                       "from rulebound.adapters.cli import main\n"
                       f"assert main(['runs', '--store', {url!r}]) == 0")
    assert "rulebound.engine.engine" in loaded  # it did list, through the engine
    assert not loaded & {"aiohttp", "psycopg", "psycopg_pool",
                         "rulebound.adapters.executors.http_tool"}
