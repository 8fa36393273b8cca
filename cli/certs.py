"""`asyncps certs DIR`: a private CA and one certificate per role, for TLS and mutual TLS.

Writes, into DIR:

    ca.pem, ca-key.pem               the job's certificate authority (keep ca-key.pem private)
    ps.pem, ps-key.pem               served by every parameter-server shard
    chief.pem, chief-key.pem         served by the chief; its client certificate to the shards
    worker.pem, worker-key.pem       the workers' client certificate
    client.pem, client-key.pem       for tools (asyncps health, scripts) under mTLS: reads only
                                     (Pull, Stats); ASYNCPS_ROLE=chief for a tool that must control

Each certificate's common name is its role (CN=ps, chief, worker, client): under mTLS the
servers authorize calls by it (protos/security.py, README "Security": control RPCs only from the
chief's certificate, data RPCs from the workers' and the chief's). So hand each process only its
own role's key, and keep ca-key.pem off every machine of the job: whoever holds it can make a
certificate of any role.

Every certificate is valid for both server and client authentication and carries SANs for
127.0.0.1, ::1, localhost, the compose service names (chief, ps, ps0 .. ps{N-1}, worker) and
any --hosts given, so the same folder serves `asyncps launch` and docker-compose. Keys are
ECDSA P-256, written with mode 0600. Then set ``cluster.security: {tls: true, dir: DIR}``
(``mtls: true`` to require client certificates).

Needs the `cryptography` package (``pip install 'asyncps[security]'``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from asyncps.errors import UserError

ROLES = ("ps", "chief", "worker", "client")


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("dir", help="folder to write the CA and the role certificates into")
    parser.add_argument("--hosts", nargs="*", default=[], metavar="HOST",
                        help="more host names or IP addresses every certificate is valid for")
    parser.add_argument("--ps", type=int, default=8, help="compose shard names ps0..ps{N-1} to include (default 8)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite certificates already in DIR")


def run(args: argparse.Namespace) -> int:
    written = make_certs(args.dir, args.hosts, ps=args.ps, days=args.days, force=args.force)
    print(f"asyncps certs: wrote {len(written)} files to {args.dir} "
          f"(set cluster.security.tls=true cluster.security.dir={args.dir})")
    return 0


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise UserError("`asyncps certs` needs the cryptography package: pip install 'cryptography>=41' "
                        "(or pip install 'asyncps[security]')") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def subject_names(hosts: Sequence[str] = (), ps: int = 8) -> list[str]:
    """Host names and addresses every certificate is valid for."""
    names = ["127.0.0.1", "::1", "localhost", "chief", "ps", "worker"] + [f"ps{i}" for i in range(ps)]
    return list(dict.fromkeys(names + list(hosts)))


def make_certs(directory: str | os.PathLike, hosts: Sequence[str] = (), ps: int = 8, days: int = 365,
               force: bool = False) -> list[Path]:
    """Writes the CA and the role certificates (see the module docstring); the paths written."""
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    if days < 1 or ps < 0:
        raise UserError("--days must be at least 1 and --ps 0 or more")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / "ca.pem", out / "ca-key.pem"] + [out / f"{r}{s}" for r in ROLES for s in (".pem", "-key.pem")]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} exists already (use --force to overwrite)")

    now = dt.datetime.now(dt.timezone.utc)
    begin, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asyncps job CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(begin).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    sans = []
    for name in subject_names(list(hosts), ps):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))

    written = [_write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
               _write(out / "ca-key.pem", _key_pem(ca_key, serialization), private=True)]
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))  # the role: authz
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(begin).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        written.append(_write(out / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM)))
        written.append(_write(out / f"{role}-key.pem", _key_pem(key, serialization), private=True))
    return written


def _key_pem(key, serialization) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL | O_NOFOLLOW: a fresh file with exactly this mode, never one planted (or linked) there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
