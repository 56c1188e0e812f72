"""The services' credential and TLS settings work against a real nats-server that demands them."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest

from oncelog.local.embedded import EmbeddedError, NatsServer
from oncelog.platform import broker
from oncelog.platform.settings import BrokerSettings, load


def start(root: Path, config: str) -> NatsServer:
    """Start nats-server with `config` written next to its store."""
    path = root / "server.conf"
    path.write_text(config)
    return NatsServer(root / "nats", config_file=path).start()


async def connects(environ: dict[str, str]) -> bool:
    """Return whether broker.connect gets a working connection with these settings."""
    settings = load(BrokerSettings, environ)
    nc = None
    with contextlib.suppress(nats.errors.Error, OSError):
        nc = await broker.connect(
            settings, "oncelog-tests", connect_timeout=2, allow_reconnect=False
        )
    if nc is None:
        # nats-py leaves a refused connection's socket to the garbage collector; collect it
        # here, where its ResourceWarning is expected, rather than in a later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        return False
    try:
        await nc.flush(timeout=2)
        return nc.is_connected
    finally:
        await nc.close()


def test_refused_config_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    """A config nats-server refuses fails start() with the server's reason, and leaks nothing.

    The suite turns ResourceWarning into an error, so a log handle left open here fails it.
    """
    with pytest.raises(EmbeddedError, match="exited with 1 while starting") as refused:
        start(tmp_path, "authorization { token: $ONCELOG_TEST_UNSET_VARIABLE }\n")
    assert "ONCELOG_TEST_UNSET_VARIABLE" in str(refused.value)
    gc.collect()


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[NatsServer]:
    """Run a server that requires a token."""
    server = start(tmp_path, 'authorization { token: "t-0k3n" }\n')
    yield server
    server.stop()


async def test_token(token_server: NatsServer) -> None:
    """NATS_TOKEN authenticates; a wrong token does not."""
    assert await connects({"NATS_URL": token_server.url, "NATS_TOKEN": "t-0k3n"})
    assert not await connects({"NATS_URL": token_server.url, "NATS_TOKEN": "wrong"})


@pytest.fixture
def nkey_seed(tmp_path: Path) -> tuple[Path, str]:
    """Write a fresh user nkey seed to a file; return the file and the public key."""
    # nkeys ships no type information; importing it as a module object keeps mypy strict here.
    nkeys = importlib.import_module("nkeys")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path / "user.nk"
    path.write_bytes(seed)
    path.chmod(0o600)
    return path, nkeys.from_seed(seed).public_key.decode()


async def test_nkey_seed_file(tmp_path: Path, nkey_seed: tuple[Path, str]) -> None:
    """NATS_NKEY_SEED (a seed file) authenticates as the user whose public key the server knows."""
    seed_file, public = nkey_seed
    server = start(tmp_path, f"authorization {{ users: [ {{ nkey: {public} }} ] }}\n")
    try:
        assert await connects({"NATS_URL": server.url, "NATS_NKEY_SEED": str(seed_file)})
        assert not await connects({"NATS_URL": server.url})
    finally:
        server.stop()


# A fresh P-256 key without a passphrase: fast to generate, fine for a throwaway test PKI.
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(*args: str, cwd: Path) -> None:
    """Run openssl in `cwd`, failing the test on error."""
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Create a CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", *NEW_KEY, "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=d)  # fmt: skip
    openssl("req", "-x509", *NEW_KEY, "-days", "1", "-subj", "/CN=other-ca",
            "-keyout", "other-key.pem", "-out", "other.pem", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", *NEW_KEY, "-subj", f"/CN={name}",
                "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


async def test_mutual_tls(tmp_path: Path, pki: Path) -> None:
    """NATS_TLS_CA, NATS_TLS_CERT and NATS_TLS_KEY connect over verified mutual TLS; anything less is refused."""
    server = start(
        tmp_path,
        "tls {\n"
        f'  cert_file: "{pki / "server.pem"}"\n'
        f'  key_file: "{pki / "server-key.pem"}"\n'
        f'  ca_file: "{pki / "ca.pem"}"\n'
        "  verify: true\n"
        "}\n",
    )
    try:
        url = f"tls://127.0.0.1:{server.port}"
        full = {
            "NATS_URL": url,
            "NATS_TLS_CA": str(pki / "ca.pem"),
            "NATS_TLS_CERT": str(pki / "client.pem"),
            "NATS_TLS_KEY": str(pki / "client-key.pem"),
        }
        assert await connects(full)
        # Without a client certificate the server refuses; with another CA the client does.
        assert not await connects({"NATS_URL": url, "NATS_TLS_CA": str(pki / "ca.pem")})
        assert not await connects(full | {"NATS_TLS_CA": str(pki / "other.pem")})
    finally:
        server.stop()
