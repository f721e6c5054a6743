"""A self-signed certificate for 127.0.0.1, for the test suite's TLS servers (moto, s3rver, Ceph).

Not used in production: fleece never makes certificates, it reads the operator's.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def self_signed_certificate(directory: Path, key_name: str, cert_name: str, *,
                            traditional_key: bool = False) -> tuple[Path, Path]:
    """Write a P-256 key and a two-day certificate for 127.0.0.1/localhost; their paths.

    ``traditional_key`` writes the key as OpenSSL's traditional EC format, else PKCS#8.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / key_name, directory / cert_name
    key_format = (serialization.PrivateFormat.TraditionalOpenSSL if traditional_key
                  else serialization.PrivateFormat.PKCS8)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, key_format,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
