"""TLS on the gateway: ``acestep-gateway --tls-cert --tls-key`` serves only over TLS.

Certificates are made here: a CA, and a server certificate it signs for 127.0.0.1 and localhost.
The gateway runs as a real process on 127.0.0.1 in front of a stand-in DiT replica (a health
service that says SERVING, all it needs to start); requests that fail validation show that the API
itself answers over TLS without any model behind it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway import sdk
from gateway.serve import ServiceProcess
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import GenerationConfig, GenerationParams

STARTUP_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0


def _certificate(subject: str, issuer_key, issuer: x509.Name | None = None, hosts: tuple[str, ...] = ()):
    """A key and a certificate for ``subject``: self-signed (a CA) when ``issuer`` is None, else a
    server certificate for ``hosts`` signed with ``issuer_key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if hosts:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer_key or key, hashes.SHA256())
    return key, certificate


def _pem(key, certificate) -> tuple[bytes, bytes]:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca = _certificate("acestep test CA", None)
    server_key, server = _certificate("acestep-gateway", ca_key, ca.subject, hosts=("127.0.0.1", "localhost"))
    other_key, other_ca = _certificate("some other CA", None)
    paths = {name: folder / f"{name}.pem" for name in ("ca", "server-key", "server-cert", "other-ca")}
    paths["ca"].write_bytes(_pem(ca_key, ca)[1])
    paths["server-key"].write_bytes(_pem(server_key, server)[0])
    paths["server-cert"].write_bytes(_pem(server_key, server)[1])
    paths["other-ca"].write_bytes(_pem(other_key, other_ca)[1])
    return paths


@pytest.fixture(scope="module")
def dit_stand_in():
    """A replica that only answers health checks (SERVING), on 127.0.0.1."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def tls_gateway(certificates: dict[str, Path], dit_stand_in: str, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("tls-gateway")
    port_file, log_path = workdir / "gateway.port", workdir / "gateway.log"
    command = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
               "--dit", dit_stand_in, "--health-interval-s", "0.2", "--drain-grace-s", "1",
               "--tls-cert", str(certificates["server-cert"]), "--tls-key", str(certificates["server-key"])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACESTEP_API_KEYS": ""}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    service = ServiceProcess("tls-gateway", process, port_file, log_path)
    try:
        service.wait_port(STARTUP_TIMEOUT_S)
        yield service
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _invalid_request() -> gw.GenerateRequest:
    """A text2music request whose duration is out of range: refused by validation, no backend call."""
    return sdk.build_request(GenerationParams(caption="tls check", duration=700.0), GenerationConfig())


def _generate(channel: grpc.Channel, request: gw.GenerateRequest) -> list[str]:
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    return [event.WhichOneof("event") for event in stub.Generate(request, timeout=CALL_TIMEOUT_S)]


def test_the_sdk_talks_to_the_gateway_over_tls(tls_gateway: ServiceProcess, certificates: dict[str, Path]) -> None:
    client = sdk.AceStepClient(tls_gateway.address, root_certificates=certificates["ca"].read_bytes())
    try:
        with pytest.raises(grpc.RpcError) as raised:
            list(client.stub().Generate(_invalid_request(), timeout=CALL_TIMEOUT_S))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
        assert "duration" in raised.value.details()
    finally:
        client.close()


def test_health_is_served_over_tls(tls_gateway: ServiceProcess, certificates: dict[str, Path]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates["ca"].read_bytes())
    for target in (tls_gateway.address, f"localhost:{tls_gateway.port}"):  # both names the certificate covers
        with grpc.secure_channel(target, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, target


def test_plaintext_clients_are_refused(tls_gateway: ServiceProcess) -> None:
    with grpc.insecure_channel(tls_gateway.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _generate(channel, _invalid_request())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value


def test_a_client_that_does_not_trust_the_issuer_is_refused(tls_gateway: ServiceProcess,
                                                            certificates: dict[str, Path]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates["other-ca"].read_bytes())
    with grpc.secure_channel(tls_gateway.address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _generate(channel, _invalid_request())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
