"""`ember federate serve|join` say what is wrong in one line, before starting any process: Flower missing
(naming the extra), no credentials (naming `ember federate init`), a bad address, a server that does not
answer, a key file that is not one, an address already in use."""
from __future__ import annotations

import importlib.util
import socket

import pytest

HAS_FLOWER = importlib.util.find_spec("flwr") is not None


def _one_line(result, *words):
    assert result.returncode != 0, result.out
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
    for word in words:
        assert word in result.err, result.err


@pytest.mark.skipif(HAS_FLOWER, reason="checks the message shown where Flower is not installed")
def test_serve_and_join_without_flower_name_the_extra_to_install(ember):
    _one_line(ember("federate", "serve", "--authorized-key", "laptop.pub"), "pip install -e '.[federated]'")
    _one_line(ember("federate", "join", "127.0.0.1:9092"), "pip install -e '.[federated]'")


@pytest.mark.skipif(not HAS_FLOWER, reason="household learning needs the federated extra")
def test_serve_and_join_say_in_one_line_what_is_missing_or_wrong(ember, home, tmp_path):
    _one_line(ember("federate", "join", "127.0.0.1:9092"), "run `ember federate init`")
    _one_line(ember("federate", "serve", "--authorized-key", str(tmp_path / "x.pub")), "run `ember federate init`")
    assert ember("federate", "init").returncode == 0
    for bad in ("not an address", "http://192.168.1.5:9092", "192.168.1.5:99999", "host:port"):
        _one_line(ember("federate", "join", bad), "bad address")
    _one_line(ember("federate", "serve", "--address", "[::1", "--authorized-key", "x.pub"), "bad address")
    with socket.socket() as s:                   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _one_line(ember("federate", "join", f"127.0.0.1:{port}"), "cannot reach", "ember federate serve")
    _one_line(ember("federate", "serve", "--address", f"127.0.0.1:{port}", "--authorized-key",
                    str(tmp_path / "missing.pub")), "cannot read the SuperNode key")
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA not-a-key\n")
    _one_line(ember("federate", "serve", "--address", f"127.0.0.1:{port}", "--authorized-key",
                    str(tmp_path / "bad.pub")), "not a SuperNode public key")
    with socket.create_server(("127.0.0.1", 0)) as taken:       # another program listens there
        _one_line(ember("federate", "serve", "--address", f"127.0.0.1:{taken.getsockname()[1]}", "--authorized-key",
                        str(home / "federation" / "supernode.pub")), "is in use")
    assert not (home / "federation" / "serve").exists()          # nothing was started


@pytest.mark.skipif(not HAS_FLOWER, reason="household learning needs the federated extra")
def test_a_missing_or_corrupt_app_signing_key_is_one_line_before_anything_starts(ember, home, tmp_path):
    assert ember("federate", "init").returncode == 0
    where = home / "federation"
    pub = str(where / "supernode.pub")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _one_line(ember("federate", "join", f"127.0.0.1:{port}", "--app-signer", str(tmp_path / "gone.pub")),
              "does not exist")
    _one_line(ember("federate", "join", f"127.0.0.1:{port}", "--app-signer", pub), "not an Ed25519 key")
    (tmp_path / "junk.pub").write_text("ssh-ed25519 AAAA-not-base64\n")
    _one_line(ember("federate", "join", f"127.0.0.1:{port}", "--app-signer", str(tmp_path / "junk.pub")),
              "not an app-signing public key")
    (where / "app-signing.key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n")
    _one_line(ember("federate", "serve", "--address", f"127.0.0.1:{port}", "--authorized-key", pub),
              "not a usable app-signing key", "ember federate init")
    (where / "app-signing.key").unlink()
    _one_line(ember("federate", "serve", "--address", f"127.0.0.1:{port}", "--authorized-key", pub),
              "app-signing.key is missing", "run `ember federate init`")
    assert not (where / "serve").exists() and not (where / "join").exists()      # nothing was started
