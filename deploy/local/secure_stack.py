"""A local stack with security on, for the security tests: Kafka with a SASL_SSL listener and
SCRAM-SHA-512 users, redis-server with ACL users only (no `default`) and a TLS port.

Everything secret here is made up per run: a test-only CA and certificates (``openssl``) in
the run directory, and the passwords the caller gives. The broker keeps a PLAINTEXT listener
on ``kafka_port`` for its own traffic and the readiness probe, and serves clients on
``sasl_ssl_port``; Redis keeps its plain port (ACL users only) beside ``tls_port``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.processes import StackError
from deploy.local.redis_server import RedisServer
from deploy.local.stack import LocalStack, StackConfig

KEYSTORE_PASSWORD = "inferq-test-keystore"  # noqa: S105
"""The password of the broker's PKCS#12 keystore; test-only, like the certificates in it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TestCertificates:
    """PEM files of a test-only CA and of a server certificate it signed for 127.0.0.1."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    server_keystore: Path
    """The server certificate and key as PKCS#12 (for the broker), `KEYSTORE_PASSWORD`."""


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"openssl {args[0]} failed:\n{result.stderr[-2000:]}")


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed test CA: (certificate, key) PEM files under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=inferq test {name}", "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def make_certificates(directory: Path, host: str = "127.0.0.1") -> TestCertificates:
    """A test CA and a server certificate for ``host`` (and localhost) signed by it."""
    ca_cert, ca_key = make_ca(directory)
    key, csr, cert = (
        directory / "server-key.pem",
        directory / "server.csr",
        directory / "server.pem",
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName=IP:{host},DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=inferq test server",
             "-keyout", str(key), "-out", str(csr))  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    keystore = directory / "server.p12"
    _openssl(
        "pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-certfile", str(ca_cert),
        "-name", "server", "-out", str(keystore), "-passout", f"pass:{KEYSTORE_PASSWORD}",
    )  # fmt: skip
    for path in (ca_key, key, keystore):
        path.chmod(0o600)
    return TestCertificates(
        ca_cert=ca_cert, server_cert=cert, server_key=key, server_keystore=keystore
    )


@dataclass(frozen=True, kw_only=True)
class SecureStackConfig(StackConfig):
    """A `StackConfig` with the secure listeners and their users.

    sasl_ssl_port: the broker's SASL_SSL client listener. tls_port: redis-server's TLS port.
    scram_users: SCRAM-SHA-512 user → password, created when the broker is formatted.
    redis_acl: ACL rules after ``user``, e.g. ``"worker on >secret ~p:* +get"``, one a user.
    """

    sasl_ssl_port: int = 9094
    tls_port: int = 6380
    scram_users: Mapping[str, str] = field(default_factory=dict)
    redis_acl: tuple[str, ...] = ()

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def redis_tls_url(self) -> str:
        return f"rediss://{self.host}:{self.tls_port}/0"


class SecureStack(LocalStack):
    """`LocalStack` with SASL_SSL on the broker and ACL users and TLS on redis-server."""

    def __init__(self, config: SecureStackConfig) -> None:
        super().__init__(config)
        self.secure = config
        self.certificates = make_certificates(config.run_dir / "pki", config.host)
        certs = self.certificates
        # One argument a word: redis-server quotes each argument of a directive.
        acl = [
            arg for rule in ("default off", *config.redis_acl) for arg in ("--user", *rule.split())
        ]
        tls = [
            "--tls-port", str(config.tls_port),
            "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca_cert),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
        self.redis = RedisServer(
            run_dir=self.run_dir,
            host=config.host,
            port=config.redis_port,
            start_timeout_s=config.start_timeout_s,
            stop_timeout_s=config.stop_timeout_s,
            extra_args=[*acl, *tls],
        )
        self.redis_log = self.redis.log
        self.redis_pid = self.redis.pid_file

    def _format_options(self) -> list[str]:
        return [
            option
            for user, password in self.secure.scram_users.items()
            for option in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")
        ]

    def _server_settings(self) -> dict[str, str]:
        settings = super()._server_settings()
        c = self.secure
        admin, admin_password = next(iter(c.scram_users.items()), ("", ""))
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{admin}" password="{admin_password}";'
        )
        internal = f"PLAINTEXT://{c.host}:{c.kafka_port}"
        secure = f"SASL_SSL://{c.host}:{c.sasl_ssl_port}"
        settings |= {
            "listeners": f"{internal},{secure},CONTROLLER://{c.host}:{c.controller_port}",
            "advertised.listeners": f"{internal},{secure}",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL"
            ),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
            "listener.name.sasl_ssl.ssl.keystore.type": "PKCS12",
            "listener.name.sasl_ssl.ssl.keystore.location": str(self.certificates.server_keystore),
            "listener.name.sasl_ssl.ssl.keystore.password": KEYSTORE_PASSWORD,
            "listener.name.sasl_ssl.ssl.key.password": KEYSTORE_PASSWORD,
        }
        return settings
