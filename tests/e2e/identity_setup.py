"""What the identity tests build at run time: a CA with server and client
certificates (SPIFFE URI SANs), a JWKS with signed tokens, and the Envoy
bootstrap edits that use them (jwt_authn before ext_proc; a listener that
requires client certificates). Nothing here is checked in."""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ISSUER = "https://idp.spendgate.test"
AUDIENCE = "spendgate"
JWT_HEADER = "x-spendgate-token"
JWT_PROVIDER = "spendgate_idp"


# ---- certificates -----------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    cert_path = path.with_suffix(".crt")
    key_path = path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pem(cert_path, key_path)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CertificateAuthority:
    """A throwaway CA; ``issue`` signs leaf certificates with the SANs given."""

    def __init__(self, workdir: Path, name: str = "spendgate test CA") -> None:
        self.workdir = workdir
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _write(workdir / name.replace(" ", "-"), self.cert, self.key)

    def issue(
        self,
        name: str,
        *,
        uris: tuple[str, ...] = (),
        server: bool = False,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    ) -> Pem:
        """A leaf certificate; a server one names ``hosts`` (DNS names and IP
        addresses) in its SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        if server:
            sans += [_host_name(h) for h in hosts]
        usage = (
            x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
            if server
            else (x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return _write(self.workdir / name, cert, key)


def require_client_certificates(config: dict[str, Any], server: Pem, ca: Pem) -> None:
    """Make Envoy's listener TLS-only, with client certificates from ``ca``
    required (DownstreamTlsContext.require_client_certificate)."""
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(server.cert)},
                        "private_key": {"filename": str(server.key)},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(ca.cert)}},
            },
        },
    }


# ---- JWTs -------------------------------------------------------------------


class Issuer:
    """An identity provider: an RSA key, its JWKS and tokens signed with it."""

    def __init__(self, kid: str = "test-key-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def jwks(self) -> str:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [{**public, "kid": self.kid, "alg": "RS256", "use": "sig"}]})

    def token(self, claims: dict[str, Any], *, expires_in: int = 600, **header: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + expires_in, **claims}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid, **header})


def verify_jwts(config: dict[str, Any], jwks: str) -> None:
    """Put Envoy's jwt_authn filter before ext_proc: a token from ISSUER in
    the JWT_HEADER header is required on every route; its payload goes to
    dynamic metadata (payload_in_metadata), which the ext_proc filter
    forwards (envoy/envoy.yaml metadata_options)."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
            "JwtAuthentication",
            "providers": {
                JWT_PROVIDER: {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "local_jwks": {"inline_string": jwks},
                    # The provider's own Authorization header stays the API
                    # key; the caller's token rides in its own header.
                    "from_headers": [{"name": JWT_HEADER}],
                    "forward": False,
                    "payload_in_metadata": "jwt_payload",
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": JWT_PROVIDER}}],
        },
    }
    filters.insert(0, jwt_filter)
