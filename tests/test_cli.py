"""The two ways into qt's command line, `python cli.py` (the root shim) and the `qt` console
script (pyproject's entry point), resolve every config in configs/ to the same config, and that
config is the file's (its own keys over qt/configs/base.yaml's)."""

from __future__ import annotations

import runpy
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from qt.cli import BASE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "studies" not in p.parts)


def _qt_entry_point():
    """The function pip's `qt` wrapper calls, read from pyproject.toml as pip reads it."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["qt"].split(":")
    return getattr(import_module(module), name)


def _printed(entry, argv: list[str], monkeypatch, capsys) -> dict:
    """What `entry` prints for `argv` with --print_config (it exits 0), as YAML."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        entry()
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_cli_py_and_the_qt_command_resolve_a_config_alike(path, monkeypatch, capsys):
    args = ["fit", "--config", str(path), "--print_config"]
    shim = _printed(
        lambda: runpy.run_path(str(ROOT / "cli.py"), run_name="__main__"),
        ["cli.py", *args], monkeypatch, capsys,
    )  # fmt: skip
    command = _printed(_qt_entry_point(), ["qt", *args], monkeypatch, capsys)
    assert shim == command
    # and it is this file's config over the base: every key the file sets has its value
    resolved = _leaves(command)
    for key, value in _leaves(yaml.safe_load(path.read_text()) or {}).items():
        if key.endswith("+"):  # callbacks+: appended to base.yaml's list
            continue
        assert resolved[key] == value, key
    # ... and a key it leaves alone keeps base.yaml's value
    base = _leaves(yaml.safe_load(BASE_CONFIG.read_text()))
    for key in ("trainer.logger.class_path", "targets.tau", "model.discount"):
        if key not in _leaves(yaml.safe_load(path.read_text()) or {}):
            assert resolved[key] == base[key], key


def test_cli_py_run_as_a_script_prints_the_same_config(tmp_path, monkeypatch, capsys):
    """The shim as a user runs it, from another folder: a process of its own."""
    path = ROOT / "configs" / "tiny.yaml"
    args = ["fit", "--config", str(path), "--print_config"]
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load(done.stdout) == _printed(
        _qt_entry_point(), ["qt", *args], monkeypatch, capsys
    )


def test_the_qt_command_names_its_commands_and_refuses_others(monkeypatch, capsys):
    main = _qt_entry_point()
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "study", "data", "diagnostics", "demo"):
        assert name in text
    assert main(["frob"]) == 2
    assert "unknown command 'frob'" in capsys.readouterr().err
