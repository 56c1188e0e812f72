"""deploy/Dockerfile builds any service in two stages and runs it unprivileged without build tools."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("gcc", "g++", "clang", "make", "build-essential", "cc1", "libc6-dev", "python3-dev")


class Stage:
    """One FROM block of the Dockerfile: its base, its name and its instructions."""

    def __init__(self, base: str, name: str) -> None:
        self.base = base
        self.name = name
        self.instructions: list[tuple[str, str]] = []


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Return the global ARG defaults and the stages, with continuation lines joined."""
    logical = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            base = words[0]
            for name, value in args.items():
                base = base.replace(f"${{{name}}}", value)
            alias = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, alias))
        elif keyword == "ARG" and not stages and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip()
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    """Return the Dockerfile's stages."""
    return parse((ROOT / "deploy" / "Dockerfile").read_text())[1]


def test_bases_are_pinned_versions(stages: list[Stage]) -> None:
    """uv and Python base images name exact versions, and build and runtime share one Python."""
    assert stages[0].base.startswith("ghcr.io/astral-sh/uv:")
    for stage in stages:
        tag = stage.base.rpartition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{stage.base} is not pinned to a version"
    build, runtime = stages[-2], stages[-1]
    assert build.base == runtime.base
    assert runtime.base.startswith("python:3.11.")
    assert "-slim" in runtime.base


def test_build_stage_syncs_one_locked_service(stages: list[Stage]) -> None:
    """The build stage installs exactly the chosen service from the lock file, without dev tools."""
    runs = " ".join(rest for keyword, rest in stages[-2].instructions if keyword == "RUN")
    sync = runs[runs.index("uv sync") :]
    words = shlex.split(sync.split("&&")[0])
    for flag in ("--frozen", "--no-dev", "--no-editable"):
        assert flag in words
    assert words[words.index("--package") + 1] == "oncelog-${SERVICE}"


def test_runtime_stage_is_unprivileged_and_has_no_build_tools(stages: list[Stage]) -> None:
    """The final stage copies only the virtual environment, installs nothing and runs as a non-root user."""
    runtime = stages[-1]
    copies = [rest for keyword, rest in runtime.instructions if keyword == "COPY"]
    assert copies == ["--from=build /app/.venv /app/.venv"]
    runs = " ".join(rest for keyword, rest in runtime.instructions if keyword == "RUN")
    assert "apt-get" not in runs
    assert "pip " not in runs
    assert "uv " not in runs
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", runs), tool
    users = [rest for keyword, rest in runtime.instructions if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the runtime stage runs as root"
    commands = [rest for keyword, rest in runtime.instructions if keyword in {"CMD", "ENTRYPOINT"}]
    assert commands == ['["oncelog-service"]']


def test_no_stage_installs_a_compiler() -> None:
    """No stage installs compilers: every dependency ships a binary wheel."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for tool in BUILD_TOOLS:
        assert not re.search(rf"install[^\n]*(?<![\w-]){re.escape(tool)}(?![\w-])", text), tool


def test_every_service_has_the_console_script_the_image_runs() -> None:
    """Each service declares the `oncelog-<service>` script that the image links as its command."""
    for service in ("consumer", "api", "publisher", "migrate"):
        pyproject = (ROOT / "services" / service / "pyproject.toml").read_text()
        assert f'oncelog-{service} = "oncelog.{service}.__main__:main"' in pyproject


def test_build_context_is_narrowed() -> None:
    """The Dockerfile's ignore file keeps everything but the workspace sources out of the context."""
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") :][:1] == ["**"]
    for kept in ("!pyproject.toml", "!uv.lock", "!libs/", "!services/", "!local/"):
        assert kept in ignore


def test_bases_are_build_arguments() -> None:
    """Both bases are global ARGs, so a machine without a registry builds from stand-ins (deploy/standins/)."""
    args, _ = parse((ROOT / "deploy" / "Dockerfile").read_text())
    assert set(args) >= {"PYTHON_IMAGE", "UV_IMAGE"}
    raw = [
        line.split()[1]
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line.startswith("FROM ")
    ]
    assert raw == ["${UV_IMAGE}", "${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_a_local_build_pulls_no_frontend() -> None:
    """Without its `# syntax` line (all a local build drops), the file uses only what dockerd's built-in frontend knows."""
    lines = (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    assert lines[0] == "# syntax=docker/dockerfile:1"
    rest = "\n".join(lines[1:])
    assert "# syntax=" not in rest
    assert all(m.startswith("type=cache,") for m in re.findall(r"--mount=(\S+)", rest))
    for newer in ("<<", "--link", "--chmod", "--parents", "--exclude", "--checksum"):
        assert newer not in rest, newer
    build = (ROOT / "deploy" / "standins" / "build.sh").read_text()
    assert "sed '1{/^# syntax=/d}'" in build
