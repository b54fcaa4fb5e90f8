"""TLS and mutual TLS on the gRPC port (--tls-cert/--tls-key/--tls-ca), with the bearer token on top."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from slimserve.client.client import SlimServeClient, SlimServeClientError

TOKEN = "tls-and-token-0123456789"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA, and a client certificate it signed
    stranger_cert: Path
    stranger_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(cn: str, ca_key, ca_cert, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if server:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's CA and client."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("slimserve test CA")
    server_key, server_cert = _leaf("slimserve", ca_key, ca_cert, server=True)
    client_key, client_cert = _leaf("slimctl", ca_key, ca_cert, server=False)
    other_key, other_cert = _ca("someone else's CA")
    stranger_key, stranger_cert = _leaf("stranger", other_key, other_cert, server=False)
    return Pki(
        ca=_write_cert(ca_cert, d / "ca.pem"),
        server_cert=_write_cert(server_cert, d / "server.pem"),
        server_key=_write_key(server_key, d / "server.key"),
        client_cert=_write_cert(client_cert, d / "client.pem"),
        client_key=_write_key(client_key, d / "client.key"),
        other_ca=_write_cert(other_cert, d / "other-ca.pem"),
        stranger_cert=_write_cert(stranger_cert, d / "stranger.pem"),
        stranger_key=_write_key(stranger_key, d / "stranger.key"),
    )


def refused(client: SlimServeClient) -> SlimServeClientError:
    with pytest.raises(SlimServeClientError) as e:
        client.server_live()
    return e.value


def test_tls_serves_and_plaintext_or_untrusting_clients_cannot_talk(server_factory, pki, digits):
    server = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with SlimServeClient(server.address, tls_ca=pki.ca) as c:
        assert c.tls and c.server_live()
        c.register("digits", digits.onnx)
        assert c.infer("digits", {"x": digits.x_test[:2]})[0] == "baseline"
    with SlimServeClient(server.address, tls_ca="") as plain:  # "" overrides any SLIMSERVE_TLS_CA: plaintext
        assert not plain.tls
        assert refused(plain).code == "UNAVAILABLE"
    with SlimServeClient(server.address, tls_ca=pki.other_ca) as untrusting:  # the server's CA is not the one it trusts
        e = refused(untrusting)
        assert e.code == "UNAVAILABLE" and "TLS" in e.message


def test_mutual_tls_needs_a_client_certificate_from_the_ca(server_factory, pki, digits):
    server = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    with SlimServeClient(server.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as c:
        c.register("digits", digits.onnx)
        assert c.infer("digits", {"x": digits.x_test[:1]})[0] == "baseline"
    with SlimServeClient(server.address, tls_ca=pki.ca, tls_cert="", tls_key="") as no_cert:
        assert refused(no_cert).code == "UNAVAILABLE"
    with SlimServeClient(server.address, tls_ca=pki.ca, tls_cert=pki.stranger_cert, tls_key=pki.stranger_key) as stranger:
        assert refused(stranger).code == "UNAVAILABLE"
    with SlimServeClient(server.address, tls_ca="", tls_cert="", tls_key="") as plain:
        assert refused(plain).code == "UNAVAILABLE"


def test_token_and_tls_together(server_factory, pki, digits, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca, token_file=token_file)
    tls = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with SlimServeClient(server.address, token="", **tls) as anonymous:  # a trusted certificate is not a token
        with pytest.raises(SlimServeClientError) as e:
            anonymous.models()
        assert e.value.code == "UNAUTHENTICATED"
    with SlimServeClient(server.address, token=TOKEN, **tls) as c:
        c.register("digits", digits.onnx)
        assert [m["name"] for m in c.models()] == ["digits"]


def test_slimctl_tls_options_and_environment(server_factory, pki, digits, monkeypatch):
    from slimserve.client.cli import app

    server = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    runner = CliRunner()
    flags = ["--server", server.address, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    result = runner.invoke(app, [*flags, "register", "digits", str(digits.onnx)])
    assert result.exit_code == 0, result.output
    for name, path in (("CA", pki.ca), ("CERT", pki.client_cert), ("KEY", pki.client_key)):
        monkeypatch.setenv(f"SLIMSERVE_TLS_{name}", str(path))
    result = runner.invoke(app, ["--server", server.address, "models", "--json"])
    assert result.exit_code == 0 and '"digits"' in result.output, result.output
    monkeypatch.delenv("SLIMSERVE_TLS_KEY")
    result = runner.invoke(app, ["--server", server.address, "models"])
    assert result.exit_code == 1 and "needs both --tls-cert and --tls-key" in result.output


@pytest.mark.parametrize(
    "files, message",
    [
        ({"tls_cert": "server_cert"}, "needs both --tls-cert and --tls-key"),
        ({"tls_ca": "ca"}, "--tls-ca alone only checks clients"),
        ({"tls_cert": "server_cert", "tls_key": "missing"}, "cannot read --tls-key"),
        ({"tls_cert": "server_key", "tls_key": "server_key", "tls_ca": "garbage"}, "is not a PEM file"),
    ],
)
def test_bad_tls_settings_stop_the_start_with_the_reason(pki, tmp_path, files, message):
    from slimserve.server.app import SlimServer
    from slimserve.server.settings import Settings

    (tmp_path / "garbage").write_text("not a certificate")
    paths = {"missing": tmp_path / "missing.key", "garbage": tmp_path / "garbage"}
    settings = Settings(repository=tmp_path / "repo", **{k: paths.get(v) or getattr(pki, v) for k, v in files.items()})
    with pytest.raises(OSError, match=message):
        SlimServer(settings)


def test_the_container_health_probe_speaks_mutual_tls(server_factory, pki):
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    server = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    mtls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert probe.main(["--address", server.address, *mtls]) == 0
    assert probe.main(["--address", server.address, "--service", "inference.GRPCInferenceService", *mtls]) == 0
    assert probe.main(["--address", server.address, "--timeout", "1"]) == 1  # plaintext against TLS: unhealthy
