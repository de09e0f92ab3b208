"""pyproject.toml and environment.yml list the same packages with the same lower bounds; the README's
named tests exist."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def normalise(requirement):
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [req for group in project["optional-dependencies"].values() for req in group]
    wanted = dict(map(normalise, project["dependencies"] + extras))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = {}
    for dep in env["dependencies"]:
        for req in dep["pip"] if isinstance(dep, dict) else [dep]:
            name, spec = normalise(req)
            if name not in ("python", "pip"):
                listed[name] = spec
    assert listed == wanted


def test_torch_requirement_is_a_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert ">=" in torch_req and "==" not in torch_req


def test_every_test_the_readme_names_exists():
    """The README backs each reliability promise with named tests: they must exist."""
    readme = (ROOT / "README.md").read_text()
    named = []
    for row in readme.splitlines():
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", row):
            current = path or current
            named.append((current, name))
    assert len(named) >= 15
    for path, name in named:
        assert path, f"README names ::{name} without its file"
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"README names {path}::{name}"
