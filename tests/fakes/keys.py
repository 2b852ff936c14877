"""Test credentials made at run time (never committed): an RSA service-account key for FCM,
EC P-256 .p8 keys for APNs, and a small PKI (CA, localhost server cert, client cert)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    """PKCS#8 PEM: the form of Google's service-account keys and Apple's .p8 files."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@dataclass(frozen=True)
class ServiceAccountKey:
    project_id: str
    client_email: str
    private_key_id: str
    key: rsa.RSAPrivateKey

    def json(self, token_uri: str) -> str:
        """The service-account JSON text, as Google's console hands it out."""
        return json.dumps({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": private_pem(self.key),
            "client_email": self.client_email,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })


def service_account(project_id: str, key: rsa.RSAPrivateKey | None = None) -> ServiceAccountKey:
    return ServiceAccountKey(
        project_id=project_id,
        client_email=f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
        private_key_id=f"{abs(hash(project_id)):040x}"[:40],
        key=key or rsa_key(),
    )


@dataclass(frozen=True)
class Pki:
    """Files under ``directory``: ca.pem, server.pem (+key), client.pem (cert and key)."""

    directory: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_file: Path
    client_common_name: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path, client_common_name: str = "Apple VoIP Services: com.example.phone") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    valid = (now - dt.timedelta(hours=1), now + dt.timedelta(days=2))
    ca_key = ec_key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ari-push test CA"))
        .issuer_name(_name("ari-push test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, key: ec.EllipticCurvePrivateKey, server: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                     else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    server_key = ec_key()
    client_key = ec_key()
    server = leaf("localhost", server_key, True)
    client = leaf(client_common_name, client_key, False)
    pem = serialization.Encoding.PEM
    pki = Pki(
        directory=directory,
        ca_file=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_file=directory / "client.pem",
        client_common_name=client_common_name,
    )
    pki.ca_file.write_bytes(ca.public_bytes(pem))
    pki.server_cert.write_bytes(server.public_bytes(pem))
    pki.server_key.write_text(private_pem(server_key))
    pki.client_file.write_text(client.public_bytes(pem).decode() + private_pem(client_key))
    return pki
