"""pyproject.toml and environment.yml must list the same dependencies."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def _env_yml_pip_deps() -> list[str]:
    # A tiny reader for the pip list of environment.yml (no YAML dependency needed).
    lines = (ROOT / "environment.yml").read_text().splitlines()
    deps, in_pip = [], False
    for line in lines:
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
            continue
        if in_pip:
            if not stripped.startswith("- "):
                break
            deps.append(stripped[2:])
    return deps


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject_deps = sorted(_norm(d) for d in project["dependencies"])
    env_deps = sorted(_norm(d) for d in _env_yml_pip_deps() if not d.startswith("-e"))
    assert env_deps == pyproject_deps


def test_environment_yml_pins_python_311():
    assert "python=3.11" in (ROOT / "environment.yml").read_text()
