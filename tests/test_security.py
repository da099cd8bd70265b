"""Who gets in: loopback by default, and beyond it only peers that present the daemon's token."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from helpers import DaemonProcess, Peer, free_port, sdbridge, wait_until

from sdbridge.daemon.security import TokenError, is_loopback, read_token
from sdbridge.wire.client import Client, Disconnected

TOKEN = "s3cret-token-for-the-tests-0123456789"
JOB = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 5, "width": 32, "height": 32}
SILENCE_S = 1.0  # how long an unauthenticated peer waits to be sure nothing comes back


@pytest.fixture(scope="module")
def guarded(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A daemon listening on every interface with a token, as a user exposing it starts it."""
    workdir = tmp_path_factory.mktemp("guarded")
    process = DaemonProcess(pipeline_dir, workdir, token=TOKEN, listen_host="0.0.0.0").start()
    yield process
    process.stop()


def test_listening_beyond_loopback_without_a_token_is_refused_at_once(tmp_path: Path) -> None:
    env = {"SDBRIDGE_TOKEN": ""}
    run = sdbridge("serve", "--listen", f"tcp://0.0.0.0:{free_port()}", "--model", "x", env=env)
    assert run.returncode == 2
    # "x" is no model: a daemon that looked for it first would have failed on that instead.
    assert "refusing to listen on tcp://0.0.0.0" in run.stderr and "--token-file" in run.stderr
    short = tmp_path / "short"
    short.write_text("1234")
    run = sdbridge(
        "serve", "--listen", "tcp://*:1", "--token-file", str(short), "--model", "x", env=env
    )
    assert run.returncode == 2 and "4 bytes; it must be 16..255" in run.stderr
    run = sdbridge("serve", "--token", TOKEN, env=env)  # no way to put it where `ps` shows it
    assert run.returncode == 2 and "unrecognized arguments: --token" in run.stderr


def test_a_null_peer_gets_nothing_no_model_no_queue_no_job(guarded: DaemonProcess) -> None:
    peer = Peer(guarded.address)
    # Once the daemon has dropped the failed handshake, a DEALER has no pipe to queue on and its
    # send would block for ever: a send that cannot go is as good as one that is ignored.
    peer.socket.setsockopt(zmq.SNDTIMEO, int(SILENCE_S * 1000))
    try:
        for op, fields in [("hello", {}), ("status", {}), ("generate", JOB)]:
            with contextlib.suppress(zmq.Again):
                peer.send(op, **fields)
        assert peer.silent(SILENCE_S)
    finally:
        peer.close()
    assert not list(guarded.output_dir.glob("*/*.png"))


def test_a_wrong_token_gets_a_zmtp_error_and_nothing_else(guarded: DaemonProcess) -> None:
    peer = Peer(guarded.address, token=TOKEN[:-1] + "X")  # differs in the last byte only
    try:
        peer.send("generate", **JOB)
        assert peer.silent(SILENCE_S)
    finally:
        peer.close()
    # On the wire: the PLAIN HELLO is answered with ERROR "400", and nothing more.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as raw:
        raw.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"PLAIN".ljust(20, b"\0") + bytes(32))
        hello = b"\x05HELLO\x08sdbridge" + bytes([5]) + b"guess"
        raw.sendall(bytes([0x04, len(hello)]) + hello)
        raw.settimeout(SILENCE_S)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := raw.recv(4096):
                received += chunk
        assert received[12:17] == b"PLAIN"
        # One command frame whose data is the status code. libzmq 4.3.5 garbles the name
        # ("\x05E" arrives as "^"), which is why the client takes any answer but WELCOME as a no.
        assert received[64] == 0x04 and received[65] == len(received) - 66
        assert received[66:].endswith(b"RROR\x03400")
    assert "refused a peer from 127.0.0.1" in guarded.log()
    assert not list(guarded.output_dir.glob("*/*.png"))


def test_the_right_token_gets_everything(guarded: DaemonProcess) -> None:
    with Client(guarded.address, timeout=30, token=TOKEN) as client:
        assert client.hello()["models"]
        result = client.generate(**JOB).result(timeout=60)
    assert Path(result["images"][0]["path"]).is_file()
    peer = Peer(guarded.address, token=TOKEN, username=b"any-user-name")  # libzmq's PLAIN agrees
    try:
        assert peer.answer("status")["event"] == "status"
    finally:
        peer.close()


def test_the_client_says_in_plain_words_what_is_wrong(guarded: DaemonProcess) -> None:
    for token, words in [
        ("wrong-token-wrong-token", "refused the token"),
        (None, "requires a token: set SDBRIDGE_TOKEN"),  # libzmq says PLAIN in its greeting
    ]:
        os.environ.pop("SDBRIDGE_TOKEN", None)
        with Client(guarded.address, timeout=5, token=token) as client:
            assert not client.wait_connected(2)
            assert words in client.state_message
            with pytest.raises(Disconnected) as refused:
                client.status()
            assert refused.value.code == "unauthorized"
            assert words in str(refused.value)


def test_the_cli_takes_the_token_from_the_environment(guarded: DaemonProcess) -> None:
    run = sdbridge("status", "--address", guarded.address, env={"SDBRIDGE_TOKEN": TOKEN})
    assert run.returncode == 0, run.stderr
    assert "queue    0 job(s)" in run.stdout
    run = sdbridge("status", "--address", guarded.address, env={"SDBRIDGE_TOKEN": "x" * 20})
    assert run.returncode == 1
    assert f"the sdbridge daemon at {guarded.address} refused the token" in run.stderr


def test_a_token_for_a_daemon_without_one_is_named_too(daemon) -> None:
    with Client(daemon.address, timeout=5, token=TOKEN) as client:
        # A loaded machine may need more than the first attempt to get the daemon's answer.
        wait_until(lambda: "takes no token" in client.state_message, timeout=15)
        assert not client.connected


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:7878", True),
        ("tcp://127.1.2.3:7878", True),
        ("tcp://[::1]:7878", True),
        ("tcp://localhost:7878", True),
        ("ipc:///tmp/sdbridge", True),
        ("tcp://0.0.0.0:7878", False),
        ("tcp://*:7878", False),
        ("tcp://[::]:7878", False),
        ("tcp://192.168.1.20:7878", False),
        ("tcp://eth0:7878", False),
        ("tcp://not a host:7878", False),
    ],
)
def test_what_counts_as_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_read_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    token_file.chmod(0o600)
    assert read_token(str(token_file), {"SDBRIDGE_TOKEN": "ignored-when-a-file-is-given"}) == (
        TOKEN.encode()
    )
    assert read_token(None, {"SDBRIDGE_TOKEN": TOKEN}) == TOKEN.encode()
    assert read_token(None, {}) is None
    with pytest.raises(TokenError, match="cannot read the token file"):
        read_token(str(tmp_path / "missing"), {})
    with pytest.raises(TokenError, match="300 bytes; it must be 16..255"):
        read_token(None, {"SDBRIDGE_TOKEN": "x" * 300})
    token_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="sdbridge.daemon.security"):
        read_token(str(token_file), {})
    assert "readable by other users" in caplog.text
