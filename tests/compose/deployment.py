"""The deployment under test: compose.yaml on the Docker engine that tests/compose/run.sh started."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oncelog.local.embedded import free_port

__all__ = ["PROFILES", "ROOT", "SERVICES", "USERS", "Result", "Stack"]

ROOT = Path(__file__).resolve().parents[2]
# Every long-running service of compose.yaml but Grafana, which has no stand-in (docs/deploy.md),
# and the demo publisher, which the tests start when they need it.
SERVICES = ("nats", "postgres", "migrate", "consumer", "retention", "api", "prometheus")
PROFILES = ("--profile", "demo", "--profile", "observability")
USERS = ("provisioner", "publisher", "loadgen", "consumer", "api")
SECRETS = (
    *(f"ONCELOG_NATS_{user.upper()}_PASSWORD" for user in USERS),
    "ONCELOG_PG_ADMIN_PASSWORD",
    "ONCELOG_PG_CONSUMER_PASSWORD",
    "ONCELOG_PG_API_PASSWORD",
    "ONCELOG_PG_PUBLISHER_PASSWORD",
    "ONCELOG_PG_RETENTION_PASSWORD",
    "ONCELOG_GRAFANA_ADMIN_PASSWORD",
    "ONCELOG_API_KEYS_PUBLISH",
    "ONCELOG_API_KEYS_READ",
)
_LETTERS = str.maketrans("0123456789", "ghijklmnop")


@dataclass(frozen=True)
class Result:
    """What a docker command printed, and how it ended."""

    code: int
    out: str
    err: str


class Stack:
    """compose.yaml with fresh secrets, its host ports on 127.0.0.1, driven through `docker compose`."""

    def __init__(self, env_file: Path, variables: dict[str, str]) -> None:
        self.env_file = env_file
        self.variables = variables
        self.docker = os.environ.get("ONCELOG_DOCKER", "docker")

    @classmethod
    def create(cls, directory: Path) -> Stack:
        """Write an env file like the one docs/deploy.md generates, with free ports on loopback."""
        # 48 letters a-p, as docs/deploy.md generates them: nats-server reads every one as a string.
        variables = {name: secrets.token_hex(24).translate(_LETTERS) for name in SECRETS}
        variables |= {
            "NATS_BIND": "127.0.0.1",
            "API_BIND": "127.0.0.1",
            "NATS_HOST_PORT": str(free_port()),
            "API_HOST_PORT": str(free_port()),
            "PROMETHEUS_HOST_PORT": str(free_port()),
            "GRAFANA_HOST_PORT": str(free_port()),
        }
        env_file = directory / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
        env_file.chmod(0o600)
        return cls(env_file, variables)

    def url(self, port_variable: str) -> str:
        """Return the loopback address of a published port."""
        return f"127.0.0.1:{self.variables[port_variable]}"

    async def docker_run(self, *args: str, limit: float = 300.0, check: bool = True) -> Result:
        """Run the docker client; fail with its output when it fails and `check` is set."""
        proc = await asyncio.create_subprocess_exec(
            self.docker,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"docker {' '.join(args)} took longer than {limit} s") from None
        result = Result(proc.returncode or 0, out.decode(), err.decode())
        if check and result.code != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.code}:\n{result.out}\n{result.err}"
            )
        return result

    async def compose(self, *args: str, limit: float = 300.0, check: bool = True) -> Result:
        """Run `docker compose` on the repository's compose.yaml with this stack's env file."""
        return await self.docker_run(
            "compose",
            "--project-directory",
            str(ROOT),
            "--file",
            str(ROOT / "compose.yaml"),
            "--env-file",
            str(self.env_file),
            *args,
            limit=limit,
            check=check,
        )

    async def up(self, *services: str) -> None:
        """Start services (and what they depend on) from the images already built; pull nothing."""
        await self.compose("up", "--detach", "--no-build", "--pull", "never", *services)

    async def containers(self, service: str) -> list[dict[str, Any]]:
        """Return `docker compose ps` of one service's containers, stopped ones included."""
        result = await self.compose("ps", "--all", "--format", "json", service)
        return [json.loads(line) for line in result.out.splitlines() if line.strip()]

    async def inspect(self, container: str) -> dict[str, Any]:
        """Return `docker inspect` of one container."""
        [info] = json.loads((await self.docker_run("inspect", container)).out)
        assert isinstance(info, dict)
        return info

    async def logs(self, service: str) -> str:
        """Return what a service's containers printed, without compose's prefixes."""
        result = await self.compose("logs", "--no-color", "--no-log-prefix", service)
        return result.out + result.err

    async def psql(self, sql: str) -> list[list[str]]:
        """Run SQL as the superuser inside the postgres container; return rows of text fields."""
        result = await self.compose(
            "exec",
            "-T",
            "postgres",
            "psql",
            "--no-psqlrc",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            "--username=postgres",
            "--dbname=oncelog",
            "--no-align",
            "--tuples-only",
            "--field-separator=|",
            "--command",
            sql,
        )
        return [line.split("|") for line in result.out.splitlines() if line]

    async def report(self, line: str) -> None:
        """Add a line to what run.sh prints at the end (ONCELOG_COMPOSE_REPORT), if it asked."""
        path = os.environ.get("ONCELOG_COMPOSE_REPORT")
        if path:

            def append() -> None:
                with Path(path).open("a") as out:
                    out.write(line + "\n")

            await asyncio.to_thread(append)

    async def metrics(self, container: str, port: int) -> str:
        """Return a container's own /metrics, read from inside it."""
        script = (
            "import sys, urllib.request; "
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5)"
            ".read().decode())"
        )
        return (await self.docker_run("exec", container, "python", "-c", script)).out
