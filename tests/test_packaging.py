"""Every data file under nvlm/ (the bundled model, the chat page) is listed in pyproject's package-data, so a
non-editable `pip install .` ships it."""

from __future__ import annotations

import fnmatch
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _matches(rel: str, pattern: str) -> bool:
    # setuptools globs: "**/" spans any number of folders (also none), "*" stays inside one
    if pattern.startswith("**/"):
        return any(fnmatch.fnmatch(rel.rsplit("/", k)[-1] if k else rel, pattern[3:])
                   for k in range(rel.count("/") + 1)) or fnmatch.fnmatch(rel, pattern)
    if "/**/" in pattern:
        head, tail = pattern.split("/**/", 1)
        return rel.startswith(head + "/") and fnmatch.fnmatch(rel.rsplit("/", 1)[-1], tail)
    return fnmatch.fnmatch(rel, pattern) and rel.count("/") == pattern.count("/")


def test_data_files_are_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nvlm"]
    pkg = ROOT / "nvlm"
    files = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(f.startswith("assets/tiny-nvlm/") for f in files) and any(f.startswith("serve/static/") for f in files)
    missing = [f for f in files if not any(_matches(f, pat) for pat in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
