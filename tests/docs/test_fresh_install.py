"""The README's first example runs from a fresh virtual environment outside the checkout,
in a project that has its own `domain/` package and `engine.py` module: rulebound installs
as one package, `rulebound`, and nothing named domain, engine or adapters lands beside it.

The wheels come from a wheelhouse built here (the checkout's wheel, and its dependencies
through pip's configured index), then install with --no-index."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .examples import ROOT, blocks

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_readme_example_runs_from_a_fresh_venv_beside_its_own_domain_package(
        tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so building leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "tests", "benchmarks", "*.db*", "__pycache__", ".*cache",
        "build", "*.egg-info"))
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation",
         "--wheel-dir", wheels, source)

    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels,
         "rulebound")

    project = tmp_path / "project"  # the user's project: its own domain/ and engine.py
    (project / "domain").mkdir(parents=True)
    (project / "domain" / "__init__.py").write_text("class User:\n    pass\n")
    (project / "engine.py").write_text("NAME = 'my engine'\n")
    first = next(b for b in blocks() if b.doc == "README.md")
    (project / "quick.py").write_text(
        "import domain, engine\n"
        "assert domain.User and engine.NAME == 'my engine'  # the project's own\n"
        + first.code)
    out = _run(python, "quick.py", cwd=project)
    assert out.startswith("completed 8\n"), out

    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    clashing = sorted(p.name for p in site.iterdir()
                      if p.name.partition(".")[0] in ("domain", "engine", "adapters"))
    assert clashing == []
    assert (site / "rulebound" / "domain" / "definitions.py").is_file()
