"""ZMTP 3.1 DEALER over a plain socket (sdbridge.wire.zmtp) against libzmq's ROUTER (pyzmq)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from helpers import free_port, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbridge.wire.zmtp import ZmtpAuthError, ZmtpConnection, ZmtpError, parse_address

HEARTBEAT_IVL_MS = 100
HEARTBEAT_TIMEOUT_MS = 400


@pytest.fixture
def router() -> Iterator[tuple[zmq.Socket, str]]:
    """A libzmq ROUTER on a free loopback port that drops peers not answering its PINGs."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 2000)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a dropped peer raises
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close()
    ctx.term()


@pytest.fixture
def conn(router: tuple[zmq.Socket, str]) -> Iterator[ZmtpConnection]:
    connection = ZmtpConnection.connect(router[1], timeout=5)
    yield connection
    connection.close()


def _peer_identity(router: zmq.Socket, conn: ZmtpConnection) -> bytes:
    conn.send([b"hi"])
    identity, body = router.recv_multipart()
    assert body == b"hi"
    return identity


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:7878", ("127.0.0.1", 7878)),
        ("tcp://[::1]:1", ("::1", 1)),
        ("tcp://localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:7878", "ipc:///tmp/x", "tcp://host", "tcp://:7878", "tcp://h:0", "tcp://::1:5"],
)
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="tcp://"):
        parse_address(address)


def test_short_frames_both_ways(router: tuple[zmq.Socket, str], conn: ZmtpConnection) -> None:
    sock, _ = router
    identity = _peer_identity(sock, conn)
    sock.send_multipart([identity, b""])
    sock.send_multipart([identity, b"x" * 255])
    assert conn.recv() == [b""]
    assert conn.recv() == [b"x" * 255]


@pytest.mark.parametrize("size", [256, 300, 64 * 1024 + 1, 9 * 1024 * 1024 + 7])
def test_long_frames_both_ways(
    router: tuple[zmq.Socket, str], conn: ZmtpConnection, size: int
) -> None:
    sock, _ = router
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    conn.send([payload])
    identity, body = sock.recv_multipart()
    assert body == payload
    sock.send_multipart([identity, payload])
    assert conn.recv() == [payload]


def test_multi_frame_messages(router: tuple[zmq.Socket, str], conn: ZmtpConnection) -> None:
    sock, _ = router
    frames = [b"a", b"", b"b" * 1000, memoryview(b"c" * 70000), bytearray(b"d" * 3)]
    conn.send(frames)
    identity, *received = sock.recv_multipart()
    assert received == [bytes(frame) for frame in frames]
    sock.send_multipart([identity, *received])
    sock.send_multipart([identity, b"next"])
    assert conn.recv() == received
    assert conn.recv() == [b"next"]


# Sizes around the short/long frame boundary and the 64 KiB buffer/coalescing boundary.
_EDGE_SIZES = [0, 1, 254, 255, 256, 257, 65535, 65536, 65537, 131073]
_FRAMES = st.lists(
    st.one_of(
        st.binary(max_size=600),
        st.sampled_from(_EDGE_SIZES).map(lambda n: bytes([n % 251]) * n),
    ),
    min_size=1,
    max_size=5,
)


def test_any_message_round_trips_through_libzmq() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)  # no heartbeats: hypothesis may pause between examples
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    conn = ZmtpConnection.connect(
        f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}", 5
    )
    try:
        identity = _peer_identity(sock, conn)

        @settings(max_examples=150, deadline=None)
        @given(_FRAMES)
        def round_trip(frames: list[bytes]) -> None:
            conn.send(frames)
            assert sock.recv_multipart() == [identity, *frames]
            sock.send_multipart([identity, *frames])
            assert conn.recv() == frames

        round_trip()
    finally:
        conn.close()
        sock.close()
        ctx.term()


def test_concurrent_senders_never_interleave(
    router: tuple[zmq.Socket, str], conn: ZmtpConnection
) -> None:
    sock, _ = router
    per_thread = 50

    def sender(tag: int) -> None:
        for n in range(per_thread):
            conn.send([bytes([tag]), bytes([tag]) * (n * 997), str(n).encode()])

    threads = [threading.Thread(target=sender, args=(tag,)) for tag in range(4)]
    for thread in threads:
        thread.start()
    seen: dict[int, list[int]] = {tag: [] for tag in range(4)}
    for _ in range(4 * per_thread):
        _, tag, body, number = sock.recv_multipart()
        n = int(number)
        assert body == tag * (n * 997)
        seen[tag[0]].append(n)
    for thread in threads:
        thread.join()
    assert all(numbers == list(range(per_thread)) for numbers in seen.values())


def _read_forever(conn: ZmtpConnection, received: list[list[bytes]]) -> None:
    while True:
        try:
            received.append([bytes(frame) for frame in conn.recv()])
        except ZmtpError:
            return


def test_idle_reader_survives_heartbeats(
    router: tuple[zmq.Socket, str], conn: ZmtpConnection
) -> None:
    sock, _ = router
    identity = _peer_identity(sock, conn)
    received: list[list[bytes]] = []
    reader = threading.Thread(target=_read_forever, args=(conn, received), daemon=True)
    reader.start()
    time.sleep(5 * HEARTBEAT_TIMEOUT_MS / 1000)
    sock.send_multipart([identity, b"still there"])  # ROUTER_MANDATORY: raises if dropped
    wait_until(lambda: bool(received))
    assert received == [[b"still there"]]
    conn.send([b"and back"])
    assert sock.recv_multipart() == [identity, b"and back"]


def test_a_peer_that_stops_reading_is_dropped(
    router: tuple[zmq.Socket, str], conn: ZmtpConnection
) -> None:
    """The control for the test above: the ROUTER's heartbeats really are on."""
    sock, _ = router
    _peer_identity(sock, conn)
    time.sleep(3 * HEARTBEAT_TIMEOUT_MS / 1000)
    with pytest.raises(ZmtpError):
        conn.recv()


def test_close_wakes_a_blocked_reader(conn: ZmtpConnection) -> None:
    received: list[list[bytes]] = []
    reader = threading.Thread(target=_read_forever, args=(conn, received))
    reader.start()
    time.sleep(0.1)
    conn.close()
    reader.join(timeout=30)  # a reader close did not wake would wait forever
    assert not reader.is_alive()
    with pytest.raises(ZmtpError):
        conn.send([b"after close"])


def test_frame_size_limit(router: tuple[zmq.Socket, str]) -> None:
    sock, address = router
    conn = ZmtpConnection.connect(address, timeout=5, max_frame_bytes=1000)
    identity = _peer_identity(sock, conn)
    sock.send_multipart([identity, b"x" * 1000])
    assert conn.recv() == [b"x" * 1000]
    sock.send_multipart([identity, b"x" * 1001])
    with pytest.raises(ZmtpError, match="1001-byte frame"):
        conn.recv()


def test_ipv6_and_host_names() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        port = sock.bind_to_random_port("tcp://*")
        addresses = [f"tcp://localhost:{port}", f"tcp://127.0.0.1:{port}"]
        if socket.has_ipv6 and _ipv6_loopback_works():
            addresses.append(f"tcp://[::1]:{port}")
        for address in addresses:
            conn = ZmtpConnection.connect(address, timeout=5)
            conn.send([address.encode()])
            assert sock.recv_multipart()[1] == address.encode()
            conn.close()
    finally:
        sock.close()
        ctx.term()


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("socket_type", "match"),
    [(zmq.DEALER, "the peer is a DEALER socket, expected a ROUTER"), (zmq.PUB, "handshake failed")],
)
def test_wrong_zmq_socket_type(socket_type: int, match: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(ZmtpError, match=match):
            ZmtpConnection.connect(f"tcp://127.0.0.1:{port}", timeout=5)
    finally:
        sock.close()
        ctx.term()


# --- peers that are not (well-behaved) ZMTP ----------------------------------------------------


@pytest.fixture
def raw_peer() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """Start a plain TCP server that runs ``script(accepted_socket)``; returns its address."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(script: Callable[[socket.socket], None]) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def serve() -> None:
            peer, _ = server.accept()
            with peer:
                script(peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return f"tcp://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    for thread in threads:
        thread.join(timeout=5)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the client closed early"
        data += chunk
    return data


def _zmtp_router_script(then: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    """A hand-written ROUTER handshake, for sending what libzmq never would."""

    def script(peer: socket.socket) -> None:
        greeting = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
        peer.sendall(greeting)
        peer.sendall(_command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER"))
        assert _recv_exact(peer, 64)[:11] == greeting[:11]
        flags, size = _recv_exact(peer, 2)
        assert flags == 0x04
        assert _recv_exact(peer, size).startswith(b"\x05READY")
        then(peer)

    return script


def _command(name: bytes, data: bytes) -> bytes:
    body = bytes([len(name)]) + name + data
    return bytes([0x04, len(body)]) + body


def test_ping_gets_pong_with_its_context_and_other_commands_are_skipped(
    raw_peer: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    pongs: list[bytes] = []

    def then(peer: socket.socket) -> None:
        peer.sendall(_command(b"PING", b"\x00\x0acontext-16-bytes"))
        peer.sendall(_command(b"SUBSCRIBE", b"topic") + _command(b"X-UNKNOWN", b""))
        peer.sendall(b"\x01\x03one" + b"\x00\x03two")  # a two-frame message
        flags, size = _recv_exact(peer, 2)
        pongs.append(_recv_exact(peer, size))
        peer.recv(1)  # wait for the client to close

    conn = ZmtpConnection.connect(raw_peer(_zmtp_router_script(then)), timeout=5)
    assert conn.recv() == [b"one", b"two"]
    wait_until(lambda: bool(pongs))  # the peer's thread reads the PONG in its own time
    conn.close()
    assert pongs == [b"\x04PONGcontext-16-bytes"]


def test_a_peer_silent_past_its_heartbeat_ttl_is_dead(
    raw_peer: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    def then(peer: socket.socket) -> None:
        peer.sendall(_command(b"PING", b"\x00\x03"))  # TTL 0.3 s, then silence
        assert _recv_exact(peer, 7) == b"\x04\x05\x04PONG"
        peer.recv(1)  # until the client gives up and closes

    conn = ZmtpConnection.connect(raw_peer(_zmtp_router_script(then)), timeout=5)
    with pytest.raises(ZmtpError, match="nothing for 0.3 s"):  # the TTL the peer asked for
        conn.recv()


@pytest.mark.parametrize(
    ("garbage", "match"),
    [
        (b"\x80\x01x", "bad ZMTP frame flags"),
        (b"\x05\x01x", "command frame with the MORE flag"),
        (b"\x04\x00", "malformed command"),
        (_command(b"ERROR", b"\x0bbad request"), "reported an error: bad request"),
        (b"\x00\x05ab", "closed the connection"),
    ],
)
def test_bad_framing_after_the_handshake(
    raw_peer: Callable[[Callable[[socket.socket], None]], str], garbage: bytes, match: str
) -> None:
    conn = ZmtpConnection.connect(
        raw_peer(_zmtp_router_script(lambda peer: peer.sendall(garbage))), timeout=5
    )
    with pytest.raises(ZmtpError, match=match):
        conn.recv()


def _then_drain(reply: bytes) -> Callable[[socket.socket], None]:
    """Send ``reply``, then read until the client hangs up: closing with its bytes unread
    would reset the connection, and a reset can destroy the reply before the client reads it."""

    def script(peer: socket.socket) -> None:
        peer.sendall(reply)
        # The client may hang up with part of the reply unread: that is a reset here.
        with contextlib.suppress(ConnectionResetError):
            while peer.recv(4096):
                pass

    return script


@pytest.mark.parametrize(
    ("script", "match"),
    [
        (_then_drain(b"HTTP/1.1 400 Bad Request\r\n" * 4), "does not speak ZMTP"),
        (lambda peer: peer.recv(1000), "closed the connection"),
        (lambda peer: None, "closed the connection|reset"),  # a reset when our data is unread
        (_then_drain(b"\xff" + bytes(8) + b"\x7f\x02" + bytes(53)), "ZMTP 2.0"),
        (_then_drain(b"\xff" + bytes(8) + b"\x7f\x03\x01CURVE" + bytes(47)), "CURVE"),
    ],
)
def test_wrong_peer_fails_fast_with_a_clear_error(
    raw_peer: Callable[[Callable[[socket.socket], None]], str],
    script: Callable[[socket.socket], None],
    match: str,
) -> None:
    # A slow failure would be the handshake timeout's error, not `match`.
    with pytest.raises(ZmtpError, match=match):
        ZmtpConnection.connect(raw_peer(script), timeout=60)


def test_silent_peer_times_out(raw_peer: Callable[[Callable[[socket.socket], None]], str]) -> None:
    address = raw_peer(lambda peer: peer.recv(1000) and peer.recv(1))  # read, then stall
    with pytest.raises(ZmtpError, match="did not complete a ZMTP handshake within 0.2 s"):
        ZmtpConnection.connect(address, timeout=0.2)


def test_nobody_listening() -> None:
    with pytest.raises(ZmtpError, match="cannot connect to"):
        ZmtpConnection.connect(f"tcp://127.0.0.1:{free_port()}", timeout=5)


# --- PLAIN (RFC 24) --------------------------------------------------------------------------


@pytest.fixture
def plain_router() -> Iterator[str]:
    """A libzmq ROUTER with PLAIN and a ZAP handler that lets in ("user", "secret") only."""
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.PLAIN_SERVER, 1)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def authenticate() -> None:
        while not stop.is_set():
            if zap.poll(20):
                request = zap.recv_multipart()
                ok = request[6:8] == [b"user", b"secret"]
                zap.send_multipart([b"1.0", request[1], b"200" if ok else b"400", b"", b"", b""])
            if sock.poll(0):
                identity, body = sock.recv_multipart()
                sock.send_multipart([identity, b"echo " + body])

    thread = threading.Thread(target=authenticate, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    stop.set()
    thread.join()
    sock.close()
    zap.close()
    ctx.term()


def test_plain_login_then_messages_flow(plain_router: str) -> None:
    conn = ZmtpConnection.connect(plain_router, timeout=5, plain=(b"user", b"secret"))
    conn.send([b"hi"])
    assert conn.recv() == [b"echo hi"]
    conn.close()


@pytest.mark.parametrize(
    ("plain", "refused", "mechanism"),
    [((b"user", b"wrong"), True, None), (None, False, "PLAIN")],
)
def test_plain_refusals_are_auth_errors(
    plain_router: str, plain: tuple[bytes, bytes] | None, refused: bool, mechanism: str | None
) -> None:
    with pytest.raises(ZmtpAuthError) as failure:
        ZmtpConnection.connect(plain_router, timeout=5, plain=plain)
    assert (failure.value.refused, failure.value.mechanism) == (refused, mechanism)


def test_plain_credentials_for_a_null_peer_are_an_auth_error(
    router: tuple[zmq.Socket, str],
) -> None:
    with pytest.raises(ZmtpAuthError, match="takes no username") as failure:
        ZmtpConnection.connect(router[1], timeout=5, plain=(b"user", b"secret"))
    assert failure.value.mechanism == "NULL"


def test_a_well_formed_error_command_carries_its_reason(
    raw_peer: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    def script(peer: socket.socket) -> None:
        peer.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"PLAIN".ljust(20, b"\0") + bytes(32))
        _recv_exact(peer, 64)
        flags, size = _recv_exact(peer, 2)
        assert _recv_exact(peer, size) == b"\x05HELLO\x04user\x05wrong"
        peer.sendall(_command(b"ERROR", b"\x0dinvalid token"))
        peer.recv(1)

    with pytest.raises(ZmtpAuthError, match="refused the credentials: invalid token") as failure:
        ZmtpConnection.connect(raw_peer(script), timeout=5, plain=(b"user", b"wrong"))
    assert failure.value.refused


def test_a_peer_that_hangs_up_during_the_greeting_may_want_another_mechanism(
    raw_peer: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    with pytest.raises(ZmtpAuthError, match="closed the connection during the greeting") as failure:
        ZmtpConnection.connect(raw_peer(lambda peer: peer.recv(11)), timeout=5)
    assert failure.value.mechanism is None and not failure.value.refused
