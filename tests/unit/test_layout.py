"""The layout is the architecture: who may import whom, checked on the source itself."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each workspace member: where its package lives, and the oncelog packages it may import.
# libs (events <- store, platform) <- services <- the run-only member (local).
MEMBERS: dict[str, tuple[str, set[str]]] = {
    "events": ("libs/events", set()),
    "platform": ("libs/platform", {"events"}),
    "store": ("libs/store", {"events"}),
    "consumer": ("services/consumer", {"events", "platform", "store"}),
    "api": ("services/api", {"events", "platform", "store"}),
    "publisher": ("services/publisher", {"events", "platform", "store"}),
    "migrate": ("services/migrate", {"events", "platform", "store"}),
    "retention": ("services/retention", {"events", "platform", "store"}),
    "local": (
        "local",
        {"events", "platform", "store", "consumer", "api", "publisher", "migrate", "retention"},
    ),
}
SERVICES = {"consumer", "api", "publisher", "migrate", "retention"}


def _imports(package: Path) -> dict[str, set[str]]:
    """Return, per module file, the oncelog packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "oncelog" and len(parts) > 1:
                    names.add(parts[1])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_a_member_imports_only_what_is_below_it(member: str) -> None:
    """No lib imports a service or the runtime; no service imports another service."""
    folder, allowed = MEMBERS[member]
    package = ROOT / folder / "src" / "oncelog" / member
    assert package.is_dir(), package
    for module, names in _imports(package).items():
        assert names - {member} <= allowed, f"{module} imports {sorted(names - allowed - {member})}"


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_a_member_declares_what_it_imports(member: str) -> None:
    """Every oncelog package a member imports is one of its declared dependencies."""
    folder, _ = MEMBERS[member]
    project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    declared = {d.split("[")[0].removeprefix("oncelog-") for d in project.get("dependencies", [])}
    used = set().union(*_imports(ROOT / folder / "src" / "oncelog" / member).values()) - {member}
    assert used <= declared, f"{member} imports {sorted(used - declared)} without declaring them"


@pytest.mark.parametrize("member", ["events", "platform", "store"])
def test_no_lib_starts_a_service(member: str) -> None:
    """A lib never names a service's module, so it cannot start one by name either."""
    folder, _ = MEMBERS[member]
    for path in (ROOT / folder / "src").rglob("*.py"):
        text = path.read_text()
        for service in SERVICES:
            assert f"oncelog.{service}" not in text, f"{path} names oncelog.{service}"


def test_every_member_is_in_the_workspace() -> None:
    """The root workspace lists exactly the members this test knows."""
    found = {
        p.parent.name if p.parent.name != "local" else "local"
        for p in ROOT.glob("*/*/pyproject.toml")
        if p.parent.parent.name in {"libs", "services"}
    } | {"local"}
    assert found == set(MEMBERS)
