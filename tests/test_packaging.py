"""pyproject.toml (uv, PEP 621) and requirements*.txt (pip) pin the same versions, so the two cannot drift."""
import platform
import re
import tomllib

import pytest
from conftest import ROOT
from packaging.specifiers import SpecifierSet

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pin(line: str) -> tuple[str, str]:
    """`name==version` with the name normalized as PEP 503 does; anything else is an error."""
    name, sep, version = line.partition("==")
    assert sep and version.strip(), f"not an exact pin: {line!r}"
    return re.sub(r"[-_.]+", "-", name.strip()).lower(), version.strip()


def requirements_file(name: str) -> set[tuple[str, str]]:
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text(encoding="utf-8").splitlines())
    return {pin(line) for line in lines if line}


@pytest.mark.parametrize("group, requirements", [
    ("dependencies", "requirements.txt"),
    ("optional-dependencies.dev", "requirements-dev.txt"),
    ("dependency-groups.dev", "requirements-dev.txt"),
    ("optional-dependencies.bench", "requirements-bench.txt"),
])
def test_pyproject_pins_what_the_requirements_file_pins(group, requirements):
    table = PYPROJECT if group.startswith("dependency-groups") else PYPROJECT["project"]
    for key in group.split("."):
        table = table[key]
    in_pyproject, in_file = {pin(spec) for spec in table}, requirements_file(requirements)
    assert in_pyproject == in_file, (
        f"pyproject.toml [{group}] and {requirements} differ: only in pyproject.toml "
        f"{sorted(in_pyproject - in_file)}, only in {requirements} {sorted(in_file - in_pyproject)}")


def test_this_interpreter_meets_requires_python():
    spec = PYPROJECT["project"]["requires-python"]
    assert platform.python_version() in SpecifierSet(spec), f"Python {platform.python_version()}, project {spec}"


def test_pytest_reads_its_settings_from_pyproject(pytestconfig):
    # a pytest.ini (or tox.ini/setup.cfg [pytest]) would win and pyproject.toml's settings would be ignored
    assert pytestconfig.inipath == ROOT / "pyproject.toml", pytestconfig.inipath
    assert pytestconfig.getini("timeout") == "900" and pytestconfig.getini("testpaths") == ["tests"]
