"""Security settings: what reaches aiokafka and redis-py, secrets from files, and secrets kept
out of reprs and errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError

from deploy.local.secure_stack import make_ca
from producers.settings import ProducerSettings
from schemas.kafka import client_options
from schemas.redis import client_options as redis_options
from schemas.redis import is_refusal, is_unavailable
from schemas.settings import KafkaSettings, RedisSettings, redact_url
from workers.settings import WorkerSettings

SECRET = "planted-Secret-5e1f"


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cert, _ = make_ca(tmp_path_factory.mktemp("pki"))
    return cert


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    options = client_options(KafkaSettings(bootstrap_servers="b:9092", request_timeout_ms=1234))
    assert options == {
        "bootstrap_servers": "b:9092",
        "request_timeout_ms": 1234,
        "security_protocol": "PLAINTEXT",
        "ssl_context": None,
    }


def test_sasl_ssl_passes_the_mechanism_credentials_and_a_verifying_context(ca_file: Path) -> None:
    settings = KafkaSettings(
        security_protocol="SASL_SSL",  # type: ignore[arg-type]
        sasl_mechanism="SCRAM-SHA-256",  # type: ignore[arg-type]
        sasl_username="svc",
        sasl_password=SECRET,  # type: ignore[arg-type]
        ssl_cafile=ca_file,
    )
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert options["sasl_plain_username"] == "svc"
    assert options["sasl_plain_password"] == SECRET
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_hostname_checks_can_be_turned_off_for_tls_alone(ca_file: Path) -> None:
    settings = KafkaSettings(security_protocol="SSL", ssl_cafile=ca_file, ssl_check_hostname=False)  # type: ignore[arg-type]
    options = client_options(settings)
    assert "sasl_mechanism" not in options
    assert options["ssl_context"].check_hostname is False
    assert options["ssl_context"].verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize("missing", ["sasl_username", "sasl_password"])
def test_sasl_without_credentials_is_refused_without_quoting_them(missing: str) -> None:
    values = {"security_protocol": "SASL_SSL", "sasl_username": "svc", "sasl_password": SECRET}
    del values[missing]
    with pytest.raises(ValidationError, match="needs sasl_username and sasl_password") as error:
        KafkaSettings(**values)  # type: ignore[arg-type]
    assert SECRET not in str(error.value)


def test_a_refused_setting_does_not_quote_a_secret_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERQ_KAFKA__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("INFERQ_KAFKA__REQUEST_TIMEOUT_MS", "-1")
    with pytest.raises(ValidationError) as error:
        WorkerSettings()
    assert SECRET not in str(error.value)


def test_secrets_are_hidden_in_reprs_and_dumps() -> None:
    settings = ProducerSettings(
        kafka=KafkaSettings(
            security_protocol="SASL_SSL", sasl_username="svc", sasl_password=SECRET
        ),  # type: ignore[arg-type]
        redis=RedisSettings(url=f"redis://svc:{SECRET}@h:6379/0", password=SECRET),  # type: ignore[arg-type]
    )
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET not in shown.replace(settings.redis.url, "")
    assert SECRET not in repr(settings)
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p%40ss@h:6380/1", "rediss://user:***@h:6380/1"),
        ("redis://user@h/0", "redis://user@h/0"),
    ],
)
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert RedisSettings(url=url).redacted_url == shown


def test_secrets_come_from_files_named_like_their_variables(tmp_path: Path) -> None:
    (tmp_path / "INFERQ_KAFKA__SASL_PASSWORD").write_text(SECRET + "\n")
    (tmp_path / "inferq_redis__password").write_text("redis-" + SECRET)
    settings = WorkerSettings(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SECRET
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "redis-" + SECRET
    assert ProducerSettings(_secrets_dir=tmp_path).redis.password is not None  # type: ignore[call-arg]


def test_a_variable_wins_over_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "INFERQ_REDIS__PASSWORD").write_text("from-file")
    monkeypatch.setenv("INFERQ_REDIS__PASSWORD", "from-env")
    settings = WorkerSettings(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "from-env"


def test_no_secrets_directory_is_no_error(tmp_path: Path) -> None:
    settings = WorkerSettings(_secrets_dir=tmp_path / "absent")  # type: ignore[call-arg]
    assert settings.redis.password is None


def test_redis_gets_credentials_and_tls_only_for_rediss(ca_file: Path) -> None:
    plain = redis_options(RedisSettings(username="w", password=SECRET))  # type: ignore[arg-type]
    assert plain["username"] == "w"
    assert plain["password"] == SECRET
    assert not any(key.startswith("ssl") for key in plain)
    tls = redis_options(RedisSettings(url="rediss://h:6380/0", ssl_ca_certs=ca_file))
    assert tls["ssl_ca_certs"] == str(ca_file)
    assert tls["ssl_check_hostname"] is True
    assert "password" not in tls


def test_a_refused_password_or_permission_is_not_waited_out() -> None:
    assert not is_unavailable(AuthenticationError("WRONGPASS"))
    assert not is_unavailable(NoPermissionError("NOPERM"))
    assert is_refusal(NoPermissionError("NOPERM"))
    assert is_unavailable(RedisConnectionError("refused"))
