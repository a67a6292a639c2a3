"""`ember federate init`: what a household needs to federate off loopback, generated on this device and
stored 0600 in `<data dir>/federation/` (0700). A CA and a SuperLink certificate for TLS (Flower's
`flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`, the SuperNode's `--root-certificates`),
and this device's SuperNode key pair for Flower's node authentication (ECDSA P-384 in OpenSSH format, as
`flower-supernode --auth-supernode-private-key` reads it; the SuperLink registers the public key), and the
household's app-signing key pair (Ed25519; `signing.py`): the server signs the Flower App it runs with it and
the devices run only apps it signed. Nothing is downloaded; `cryptography` comes with Flower.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Sequence

from adapters.base import write_private
from adapters.errors import InvalidInput
from assistant.federation import signing
from storage.private import private_dirs

TLS_FILES = ("ca.pem", "ca.key", "superlink.pem", "superlink.key", "supernode.key", "supernode.pub")
FILES = TLS_FILES + (signing.PRIVATE, signing.PUBLIC)


def folder(home: Path) -> Path:
    """Where a device's federation credentials live."""
    return home / "federation"


def create(home: Path, *, addresses: Sequence[str] = (), days: int = 825) -> dict[str, str]:
    """Generate the CA, the SuperLink certificate (for 127.0.0.1, localhost and `addresses`), the SuperNode
    key pair and the app-signing key pair. A device made before app signing existed keeps its TLS files
    and gains the signing pair; `InvalidInput` if everything already exists or a group is incomplete
    (remove the folder to start again)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    where = folder(home)
    groups = {"tls": TLS_FILES, "signing": (signing.PRIVATE, signing.PUBLIC)}
    present = {group: [name for name in names if (where / name).exists()] for group, names in groups.items()}
    for group, names in groups.items():
        if present[group] and len(present[group]) < len(names):
            missing = next(name for name in names if name not in present[group])
            raise InvalidInput(f"{where / missing} is missing but {where / present[group][0]} exists; "
                               f"remove {where} to make new credentials")
    if all(present.values()):
        raise InvalidInput(f"{where / FILES[0]} already exists; remove {where} to make new credentials")
    private_dirs(where)
    os.chmod(where, 0o700)
    if not present["signing"]:
        signing.create(where)
    if present["tls"]:                   # credentials from before app signing: kept as they are
        return {name: str(where / name) for name in FILES}
    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP384R1())

    def pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def names(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key, link_key = key(), key()
    ca = (x509.CertificateBuilder().subject_name(names("Ember household CA")).issuer_name(names("Ember household CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    alt: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for address in addresses:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            alt.append(x509.DNSName(address))
    link = (x509.CertificateBuilder().subject_name(names("Ember SuperLink")).issuer_name(ca.subject)
            .public_key(link_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    node_key = key()
    contents = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM), "ca.key": pem(ca_key),
        "superlink.pem": link.public_bytes(serialization.Encoding.PEM), "superlink.key": pem(link_key),
        "supernode.key": node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()),
        "supernode.pub": node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH) + b"\n",
    }
    for name, data in contents.items():
        write_private(where / name, data)
    return {name: str(where / name) for name in FILES}
