"""Signed Flower Apps: the household's server signs the FAB it runs and every device executes only FABs
signed by that one key, with Flower 1.42's own mechanism.

- Signing is what `flwr app review` does (flwr/cli/app_cmd/review.py `_sign_fab`): an Ed25519 signature
  over `create_message_to_sign(sha256(fab), signed_at)` (flwr/supercore/primitives/asymmetric_ed25519.py:
  8-byte big-endian Unix time + the FAB's SHA-256 digest).
- The signature travels in the FAB's `verifications`, in the form the SuperLink gives a verified app
  (flwr/superlink/servicer/control/control_handlers.py `_format_verification`): `{public_key_id:
  json({"signature": base64url, "signed_at": int}), "valid_license": "Valid"}`.
- A SuperNode started with `--trusted-entities FILE` (a YAML map `{public_key_id: "ssh-ed25519 ..."}`)
  refuses every message of a run whose FAB carries no verification, or none that a trusted key verifies
  (flwr/supernode/start_client_internal.py `_pull_and_store_message`, `_verify_fab`): it logs an ERROR
  and answers with a FAB_VERIFICATION_ERROR reply instead of starting the ClientApp.

The open-source SuperLink keeps a FAB's verifications only for an app stored in its state (a Hub app, or
`LinkState.store_app`); a FAB sent in `StartRun` is stored with none. So `serving.py` stores the signed FAB
in its SuperLink's own database before the SuperLink starts and starts the run from the stored app.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

from adapters.base import write_private
from storage.errors import EmberError, InvalidInput

PRIVATE, PUBLIC = "app-signing.key", "app-signing.pub"


class UntrustedSigner(EmberError):
    """A signing key is not the one the devices trust."""


def create(folder: Path) -> dict[str, str]:
    """A new Ed25519 key pair in OpenSSH format, as Flower's `load_private_key` and `--trusted-entities`
    read it: `app-signing.key` and `app-signing.pub` (0600) in `folder`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    write_private(folder / PRIVATE, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
    write_private(folder / PUBLIC, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return {PRIVATE: str(folder / PRIVATE), PUBLIC: str(folder / PUBLIC)}


def load_private(path: Path):
    """The Ed25519 signing key at `path` (Flower's `load_private_key`); `InvalidInput` when unreadable,
    corrupt or not Ed25519."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key

    try:
        return load_private_key(Path(path))
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidInput(f"{path} is not a usable app-signing key ({str(err) or type(err).__name__}); "
                           f"remove it and run `ember federate init` to make a new one") from None


def load_public(path: Path) -> str:
    """The one Ed25519 public key (an `ssh-ed25519 ...` line) in `path`; `InvalidInput` otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"cannot read the app-signing key {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        if len(lines) != 1:
            raise ValueError(f"{len(lines)} lines")
        key = serialization.load_ssh_public_key(lines[0].encode())
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{path} is not an app-signing public key (app-signing.pub): {err}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInput(f"{path} is not an Ed25519 key; use the app-signing.pub `ember federate init` made")
    return lines[0]


def public_line(private_key) -> str:
    """The `ssh-ed25519 ...` line of a signing key's public half."""
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH).decode()


def key_id(public: str) -> str:
    """The public-key id a FAB's verification and a trusted-entities file name this key by."""
    blob = public.split()[1] if len(public.split()) > 1 else public
    return "fpk_ember_" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def verifications(fab: bytes, private_key, *, signed_at: int | None = None) -> dict[str, str]:
    """The FAB's `verifications`: one Ed25519 signature by `private_key` over Flower's message to sign
    (`create_message_to_sign(sha256(fab), signed_at)`), keyed by the key's id."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, sign_message

    when = int(time.time()) if signed_at is None else int(signed_at)
    signature = sign_message(private_key, create_message_to_sign(hashlib.sha256(fab).digest(), when))
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
    return {key_id(public_line(private_key)): json.dumps({"signature": encoded, "signed_at": when}),
            "valid_license": "Valid"}


def write_trusted_entities(path: Path, public: str) -> Path:
    """The SuperNode's `--trusted-entities` file (0600): the one key whose signed apps this device runs.
    JSON is YAML, which Flower reads with `yaml.safe_load`."""
    write_private(path, (json.dumps({key_id(public): public}) + "\n").encode())
    return path
