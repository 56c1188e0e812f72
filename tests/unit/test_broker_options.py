"""NATS credentials and TLS settings from the environment become nats-py connect options."""

from __future__ import annotations

import ssl

import certifi
import pytest

from oncelog.platform.broker import connect_options
from oncelog.platform.settings import BrokerSettings, SettingsError, load


def test_no_credentials_mean_no_options() -> None:
    """With an empty environment the connection carries no credentials and no TLS."""
    assert connect_options(load(BrokerSettings, {})) == {}


def test_user_and_password() -> None:
    """NATS_USER and NATS_PASSWORD become nats-py's user and password."""
    options = connect_options(
        load(BrokerSettings, {"NATS_USER": "consumer", "NATS_PASSWORD": "s3cret"})
    )
    assert options == {"user": "consumer", "password": "s3cret"}


def test_token() -> None:
    """NATS_TOKEN becomes nats-py's token."""
    assert connect_options(load(BrokerSettings, {"NATS_TOKEN": "t0ken"})) == {"token": "t0ken"}


def test_nkey_seed_and_credentials_files() -> None:
    """NATS_NKEY_SEED and NATS_CREDS are file paths handed to nats-py as they are."""
    seed = connect_options(load(BrokerSettings, {"NATS_NKEY_SEED": "/run/secrets/consumer.nk"}))
    creds = connect_options(load(BrokerSettings, {"NATS_CREDS": "/run/secrets/consumer.creds"}))
    assert seed == {"nkeys_seed": "/run/secrets/consumer.nk"}
    assert creds == {"user_credentials": "/run/secrets/consumer.creds"}


def test_tls_ca_gives_a_verifying_context() -> None:
    """NATS_TLS_CA yields an SSL context that verifies the server's certificate and name."""
    options = connect_options(load(BrokerSettings, {"NATS_TLS_CA": certifi.where()}))
    context = options["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_tls_url_scheme_turns_tls_on() -> None:
    """A tls:// URL uses TLS with the system's trust store even without a CA setting."""
    options = connect_options(load(BrokerSettings, {"NATS_URL": "tls://nats.internal:4222"}))
    assert isinstance(options["tls"], ssl.SSLContext)


def test_missing_ca_file_fails_loudly() -> None:
    """A CA path that does not exist is an error at start, not a silent plaintext fallback."""
    with pytest.raises(FileNotFoundError):
        connect_options(load(BrokerSettings, {"NATS_TLS_CA": "/nonexistent/ca.pem"}))


def test_credential_settings_are_strings() -> None:
    """Credential variables are read as plain strings; a non-string override is refused."""
    with pytest.raises(SettingsError, match="NATS_USER"):
        load(BrokerSettings, {}, nats_user=7)
