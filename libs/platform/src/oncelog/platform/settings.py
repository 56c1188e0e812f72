"""Typed settings read once from the environment and passed down explicitly.

What every service shares lives here; each service declares its own settings on top.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

import msgspec

__all__ = [
    "EMBEDDED_DATABASE",
    "EMBEDDED_HOST",
    "EMBEDDED_PORTS",
    "BrokerSettings",
    "CommonSettings",
    "LogLevel",
    "Port",
    "Positive",
    "PositiveFloat",
    "SettingsError",
    "embedded_port",
    "load",
    "stack_environ",
]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
# Python's level names, in any case: anything else would only fail later, inside logging.
LogLevel = Annotated[str, msgspec.Meta(pattern="(?i)^(debug|info|warning|error|critical)$")]


class SettingsError(ValueError):
    """A setting from the environment has a value that cannot be used."""


class BrokerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the broker is and how the EVENTS stream and its durable consumer are shaped."""

    nats_url: str = "nats://127.0.0.1:4222"
    stream: str = "EVENTS"
    subject_prefix: str = "events"
    durable: str = "aggregator"
    # How long JetStream remembers a Nats-Msg-Id; retries inside it are dropped by the broker.
    duplicate_window_seconds: PositiveFloat = 120.0
    # The stream refuses new publishes when full (discard=new), so this bounds disk use
    # without ever evicting an unconsumed event.
    stream_max_bytes: Positive = 8 * 1024**3
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    ack_wait_seconds: PositiveFloat = 30.0
    max_ack_pending: Positive = 50_000
    # Credentials, each optional: user and password, a token, an nkey seed file, or a
    # credentials (JWT + seed) file; the seed and credentials are paths to files.
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_nkey_seed: str = ""
    nats_creds: str = ""
    # Reply inboxes' subject prefix (NATS_INBOX_PREFIX): auth.conf gives each user only its own.
    nats_inbox_prefix: Annotated[
        str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\Z")
    ] = "_INBOX"
    # TLS: a CA bundle to verify the server, and a client certificate and key for mutual TLS.
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    # ONCELOG_FAST_WIRE=0 keeps nats-py's public path for receiving and publishing, leaving
    # its internals untouched (see oncelog.platform.wire).
    oncelog_fast_wire: bool = True


class CommonSettings(BrokerSettings, frozen=True, kw_only=True):
    """Broker settings plus where PostgreSQL is and how the pool is sized."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/oncelog"
    db_pool_min: Positive = 1
    db_pool_max: Positive = 4
    statement_timeout_ms: Positive = 30_000
    # DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).
    log_level: LogLevel = "INFO"


# Where `just up` runs its embedded servers when NATS_URL and DATABASE_URL name no others:
# loopback, on the ports of these variables (0 there means any free port).
EMBEDDED_HOST = "127.0.0.1"
EMBEDDED_DATABASE = "oncelog"
EMBEDDED_PORTS: Mapping[str, int] = MappingProxyType(
    {"NATS_PORT": 4222, "NATS_MONITOR_PORT": 8222, "PG_PORT": 5432}
)


def embedded_port(name: str, environ: Mapping[str, str] | None = None) -> int:
    """Return the port named by `name` (a key of EMBEDDED_PORTS), else its default."""
    env = os.environ if environ is None else environ
    value = env.get(name, str(EMBEDDED_PORTS[name]))
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise SettingsError(f"invalid setting: {name}={value!r} is not a port number")
    return port


def stack_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment with NATS_URL and DATABASE_URL as `just up` gives its services.

    A URL already set is kept (`just up` then starts no embedded server for it); an unset one
    names the embedded server on NATS_PORT or PG_PORT, so a tool run with the environment of
    `just up` reaches the stack it started.
    """
    env = dict(os.environ if environ is None else environ)
    if "NATS_URL" not in env:
        env["NATS_URL"] = f"nats://{EMBEDDED_HOST}:{embedded_port('NATS_PORT', env)}"
    if "DATABASE_URL" not in env:
        port = embedded_port("PG_PORT", env)
        env["DATABASE_URL"] = f"postgresql://postgres@{EMBEDDED_HOST}:{port}/{EMBEDDED_DATABASE}"
    return env


S = TypeVar("S", bound=msgspec.Struct)


def load(kind: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Build `kind` from upper-case environment variables named like its fields.

    Values are converted from strings (`strict=False`); a bad value raises SettingsError naming
    the variable.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name in kind.__struct_fields__:
        key = name.upper()
        if key in env:
            raw[name] = env[key]
    raw.update(overrides)
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # msgspec names the field as `$.field`; users set upper-case variables.
        for name in kind.__struct_fields__:
            message = message.replace(f"`$.{name}`", name.upper())
        raise SettingsError(f"invalid setting: {message}") from None
