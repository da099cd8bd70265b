"""ZMTP 3.1 (ZeroMQ RFC 23/37) as a DEALER over a plain TCP socket, NULL or PLAIN mechanism.

Pure Python (stdlib only) because Krita's and GIMP's Python cannot load pyzmq. It covers what a
DEALER talking to the daemon's ROUTER needs: greeting, NULL handshake or PLAIN login (RFC 24),
multi-frame messages with short and long frames, and PING -> PONG. `ZmtpConnection` is safe
for one reader thread plus any number of sending threads; it does no reconnecting (that is
`sdbridge.wire.client`'s job).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import sys
import threading
from collections.abc import Sequence

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "Frame",
    "ZmtpAuthError",
    "ZmtpConnection",
    "ZmtpError",
    "parse_address",
]

# A result can carry several full-size raw RGBA images (8 x 4096 x 4096 x 4 = 512 MiB), so the
# bound sits above that; it exists to stop a corrupt size field from allocating terabytes.
DEFAULT_MAX_FRAME_BYTES = 1 << 30

# Received frames over 64 KiB come as the bytearray the kernel wrote into (no copy to bytes).
Frame = bytes | bytearray

_FLAG_MORE = 0x01
_FLAG_LONG = 0x02
_FLAG_COMMAND = 0x04
_SHORT_MAX = 255
# Bodies up to this size are copied next to their header (one send call); larger ones are sent
# from the caller's buffer as they are, so a huge frame is never copied.
_COALESCE_MAX = 64 * 1024
_READ_CHUNK = 64 * 1024
_GREETING_SIZE = 64
_GREETING_SPLIT = 11  # signature (10 bytes) and major version
_NULL = b"NULL"
_PLAIN = b"PLAIN"
_SOCKET_TYPE = b"DEALER"
# libzmq 4.3.5's PLAIN server sends ERROR without its name's length byte: `^RROR` + reason.
_LIBZMQ_PLAIN_ERROR = b"^RROR"
# The ERROR reason (a ZAP status code) of an sdbridge daemon with too many connections open.
ZAP_FULL_REASON = "500"
_PEER_SOCKET_TYPE = b"ROUTER"
# Without this a write to a closed peer raises SIGPIPE in hosts that do not ignore it (Python
# does, but an embedding editor may not).
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# macOS has no MSG_NOSIGNAL but a socket option to the same end (Python does not name it).
_SO_NOSIGPIPE = 0x1022 if sys.platform == "darwin" else None


class ZmtpError(ConnectionError):
    """The connection is unusable: the peer went away or broke the ZMTP framing."""


class ZmtpAuthError(ZmtpError):
    """The peer and we disagree about credentials: it refused ours (``refused``), or it wants
    some and we have none, or the other way round. ``mechanism`` is the peer's, if it said."""

    def __init__(self, message: str, refused: bool = False, mechanism: str | None = None) -> None:
        super().__init__(message)
        self.refused = refused
        self.mechanism = mechanism


class ZmtpFullError(ZmtpError):
    """The daemon has as many connections open as it takes: no refusal of credentials, retry."""


def _raise_if_full(reason: str) -> None:
    """An ERROR for too many connections is no refusal of the credentials: retry later."""
    if reason == ZAP_FULL_REASON:
        raise ZmtpFullError(
            "the daemon has too many connections open (limits.max_connections); try again later"
        )


def parse_address(address: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` (IPv4, ``[IPv6]`` or a host name) into ``(host, port)``."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme != "tcp":
        raise ValueError(f"not a tcp:// address: {address!r} (expected tcp://HOST:PORT)")
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 hosts need brackets, as in tcp://[::1]:7878: {address!r}")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad address {address!r} (expected tcp://HOST:PORT, port 1-65535)")
    return host, int(port_text)


def _greeting(mechanism: bytes) -> bytes:
    # signature (FF, 8 padding, 7F), version 3.1, mechanism, as-server = 0, filler
    return b"\xff" + bytes(8) + b"\x7f\x03\x01" + mechanism.ljust(20, b"\0") + bytes(32)


def _frame_header(flags: int, size: int) -> bytes:
    if size > _SHORT_MAX:
        return struct.pack(">BQ", flags | _FLAG_LONG, size)
    return struct.pack(">BB", flags, size)


def _command(name: bytes, data: bytes) -> bytes:
    body = bytes((len(name),)) + name + data
    return _frame_header(_FLAG_COMMAND, len(body)) + body


def _parse_properties(data: bytes) -> dict[bytes, bytes]:
    """Metadata of a READY command: (1-byte name length, name, 4-byte value length, value)*."""
    properties: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        name_len = data[pos]
        name = data[pos + 1 : pos + 1 + name_len]
        pos += 1 + name_len
        if len(name) != name_len or pos + 4 > len(data):
            raise ZmtpError("malformed READY properties from the peer")
        (value_len,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + value_len > len(data):
            raise ZmtpError("malformed READY properties from the peer")
        properties[name.lower()] = data[pos : pos + value_len]
        pos += value_len
    return properties


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``sock`` to have data (or EOF, or an error)."""
    if hasattr(select, "poll"):  # select() cannot watch descriptors >= 1024 on Linux
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    return bool(select.select([sock], [], [], timeout)[0])  # Windows: no poll, no such limit


class ZmtpConnection:
    """One handshaken ZMTP connection to a ROUTER. Build it with `ZmtpConnection.connect`."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._sock = sock
        self._max_frame_bytes = max_frame_bytes
        self._send_lock = threading.Lock()
        self._buffer = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buffer)
        self._start = 0  # unread bytes are self._buffer[self._start:self._end]
        self._end = 0
        self._closed = False
        # From the peer's PINGs: after this long without a byte from it, the link is dead (a
        # frozen daemon or a dropped network leaves a TCP connection open but silent).
        self._peer_ttl: float | None = None

    @classmethod
    def connect(
        cls,
        address: str,
        timeout: float,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        plain: tuple[bytes, bytes] | None = None,
    ) -> ZmtpConnection:
        """Connect and handshake within ``timeout`` seconds; raise `ZmtpError` if that fails.

        ``plain`` is a (username, password) pair, each up to 255 bytes, for a peer that uses
        the PLAIN mechanism; without it the mechanism is NULL. A peer that refuses the
        credentials, or expects the other mechanism, raises `ZmtpAuthError`.
        After the handshake the socket blocks without a timeout: the caller keeps a thread
        reading, and `close` from another thread wakes it.
        """
        if plain is not None and any(len(part) > 255 for part in plain):
            raise ValueError("a PLAIN username or password is at most 255 bytes")
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as exc:
            raise ZmtpError(f"connecting to {address} timed out after {timeout:g} s") from exc
        except OSError as exc:
            raise ZmtpError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
        conn = cls(sock, max_frame_bytes)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if _SO_NOSIGPIPE is not None:
                sock.setsockopt(socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
            conn._handshake(plain)
            sock.settimeout(None)
        except ZmtpAuthError:
            conn.close()
            raise
        except TimeoutError as exc:
            conn.close()
            raise ZmtpError(
                f"{address} accepted the connection but did not complete a ZMTP handshake "
                f"within {timeout:g} s (is it an sdbridge daemon?)"
            ) from exc
        except OSError as exc:  # ZmtpError included
            conn.close()
            raise ZmtpError(f"{address}: the ZMTP handshake failed: {exc}") from exc
        return conn

    def _handshake(self, plain: tuple[bytes, bytes] | None) -> None:
        # Signature and major version first: libzmq then sends its whole greeting, naming its
        # mechanism, before it sees ours and hangs up on a mismatch (RFC 23 allows this split).
        ours = _PLAIN if plain else _NULL
        greeting = _greeting(ours)
        self._sendall([greeting[:_GREETING_SPLIT]])
        try:
            peer = self._read_exact(_GREETING_SIZE)
        except ZmtpError as exc:
            if bytes(self._view[self._start : self._end][:1]) not in (b"", b"\xff"):
                raise ZmtpError("the peer does not speak ZMTP (bad greeting signature)") from exc
            raise ZmtpAuthError(
                "the peer closed the connection during the greeting, as libzmq does when it "
                f"expects another mechanism than {ours.decode()}"
            ) from exc
        if peer[0] != 0xFF or not peer[9] & 0x01:
            raise ZmtpError("the peer does not speak ZMTP (bad greeting signature)")
        if peer[10] < 3:
            raise ZmtpError(f"the peer speaks ZMTP {peer[10]}.{peer[11]}, 3.x is required")
        mechanism = bytes(peer[12:32]).rstrip(b"\0")
        if mechanism == _PLAIN and plain is None:
            raise ZmtpAuthError("the peer requires a username and password", mechanism="PLAIN")
        if mechanism == _NULL and plain is not None:
            raise ZmtpAuthError("the peer takes no username and password", mechanism="NULL")
        if mechanism != ours:
            raise ZmtpError(f"the peer wants security mechanism {mechanism!r}, not NULL or PLAIN")
        rest = greeting[_GREETING_SPLIT:]  # sent with our first command: one write, not two
        if plain is not None:
            username, password = plain
            hello = bytes((len(username),)) + username + bytes((len(password),)) + password
            self._sendall([rest, _command(b"HELLO", hello)])
            # libzmq answers refused credentials with ERROR (or just closes): both mean "no".
            try:
                name, data = self._read_command()
            except ZmtpError as exc:
                refusal = f"the peer refused the credentials ({exc})"
                raise ZmtpAuthError(refusal, refused=True) from exc
            if name == b"ERROR":
                reason = self._error_reason(data)
                _raise_if_full(reason)
                raise ZmtpAuthError(f"the peer refused the credentials: {reason}", refused=True)
            if name != b"WELCOME":
                raise ZmtpError(f"expected WELCOME from the peer, got {name!r}")
            self._sendall([_command(b"INITIATE", self._ready_properties())])
        else:
            self._sendall([rest, _command(b"READY", self._ready_properties())])
        name, data = self._read_command()
        if name == b"ERROR":
            reason = self._error_reason(data)
            _raise_if_full(reason)
            raise ZmtpError(f"the peer refused the handshake: {reason}")
        if name != b"READY":
            raise ZmtpError(f"expected READY from the peer, got {name!r}")
        socket_type = _parse_properties(data).get(b"socket-type")
        if socket_type != _PEER_SOCKET_TYPE:
            shown = socket_type.decode("ascii", "replace") if socket_type else "untyped"
            raise ZmtpError(f"the peer is a {shown} socket, expected a ROUTER")

    def _read_command(self) -> tuple[bytes, bytes]:
        flags, body = self._read_frame()
        if not flags & _FLAG_COMMAND:
            raise ZmtpError("the peer sent a message before completing the handshake")
        return self._split_command(body)

    @staticmethod
    def _ready_properties() -> bytes:
        name = b"Socket-Type"
        return bytes((len(name),)) + name + struct.pack(">I", len(_SOCKET_TYPE)) + _SOCKET_TYPE

    @staticmethod
    def _split_command(body: Frame) -> tuple[bytes, bytes]:
        if bytes(body[:5]) == _LIBZMQ_PLAIN_ERROR:
            return b"ERROR", bytes(body[5:])
        if not body or len(body) < 1 + body[0]:
            raise ZmtpError("malformed command frame from the peer")
        return bytes(body[1 : 1 + body[0]]), bytes(body[1 + body[0] :])

    @staticmethod
    def _error_reason(data: bytes) -> str:
        return bytes(data[1 : 1 + data[0]]).decode("utf-8", "replace") if data else "no reason"

    def send(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send one message made of ``frames`` (at least one); atomic across threads.

        Raises `ZmtpError` if the connection is gone.
        """
        if not frames:
            raise ValueError("a message has at least one frame")
        chunks: list[bytes | bytearray | memoryview] = []
        last = len(frames) - 1
        for index, frame in enumerate(frames):
            size = memoryview(frame).nbytes
            chunks.append(_frame_header(_FLAG_MORE if index < last else 0, size))
            chunks.append(frame)
        try:
            self._sendall(chunks)
        except OSError as exc:
            self.close()  # a partly sent frame leaves the stream unusable
            raise ZmtpError(f"the connection broke: {exc}") from exc

    def _sendall(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        pending = bytearray()
        with self._send_lock:
            for chunk in chunks:
                if memoryview(chunk).nbytes <= _COALESCE_MAX:
                    pending += chunk
                    continue
                if pending:
                    self._sock.sendall(pending, _SEND_FLAGS)
                    pending.clear()
                self._sock.sendall(chunk, _SEND_FLAGS)
            if pending:
                self._sock.sendall(pending, _SEND_FLAGS)

    def recv(self) -> list[Frame]:
        """Block until the next message arrives and return its frames.

        PINGs are answered with PONGs on the way; other commands are skipped. Raises `ZmtpError`
        when the peer closes the connection or sends something that is not ZMTP.
        """
        frames: list[Frame] = []
        try:
            while True:
                flags, body = self._read_frame()
                if flags & _FLAG_COMMAND:
                    self._handle_command(body)
                    continue
                frames.append(body)
                if not flags & _FLAG_MORE:
                    return frames
        except ZmtpError:
            self.close()
            raise
        except OSError as exc:  # a reset, or close() from another thread
            self.close()
            raise ZmtpError(f"the connection broke: {exc}") from exc

    def _handle_command(self, body: Frame) -> None:
        name, data = self._split_command(body)
        if name == b"PING":
            # data: 2-byte TTL (deciseconds, 0 = none), then up to 16 bytes the PONG echoes
            if len(data) >= 2 and (ttl := struct.unpack_from(">H", data)[0]):
                self._peer_ttl = ttl / 10
            self._sendall([_command(b"PONG", data[2:18])])
        elif name == b"ERROR":
            raise ZmtpError(f"the peer reported an error: {self._error_reason(data)}")
        # PONG, SUBSCRIBE, CANCEL and unknown commands need nothing from a DEALER.

    def _read_frame(self) -> tuple[int, Frame]:
        flags = self._read_exact(1)[0]
        if flags & ~(_FLAG_MORE | _FLAG_LONG | _FLAG_COMMAND):
            raise ZmtpError(f"bad ZMTP frame flags {flags:#04x} from the peer")
        if flags & _FLAG_LONG:
            (size,) = struct.unpack(">Q", self._read_exact(8))
        else:
            size = self._read_exact(1)[0]
        if size > self._max_frame_bytes:
            raise ZmtpError(
                f"the peer sent a {size}-byte frame, over the {self._max_frame_bytes}-byte limit"
            )
        if flags & _FLAG_COMMAND and flags & _FLAG_MORE:
            raise ZmtpError("the peer sent a command frame with the MORE flag")
        return flags, self._read_exact(size)

    def _read_exact(self, size: int) -> Frame:
        """Exactly ``size`` bytes: small reads via a buffer, big bodies straight into place."""
        available = self._end - self._start
        if size <= available:
            data = bytes(self._view[self._start : self._start + size])
            self._start += size
            return data
        if size <= len(self._buffer):
            # Compact, then fill the buffer with as much as the kernel has (fewer syscalls).
            # Through the memoryview: it copies overlapping ranges safely (memmove).
            self._view[:available] = self._view[self._start : self._end]
            self._start, self._end = 0, available
            while self._end < size:
                self._end += self._recv_into(self._view[self._end :])
            data = bytes(self._view[:size])
            self._start = size
            return data
        # A big body: allocate it once and let the kernel write into it directly.
        out = bytearray(size)
        view = memoryview(out)
        view[:available] = self._view[self._start : self._end]
        self._start = self._end = 0
        got = available
        while got < size:
            got += self._recv_into(view[got:])
        return out

    def _recv_into(self, view: memoryview) -> int:
        if self._peer_ttl is not None and not _readable(self._sock, self._peer_ttl):
            raise ZmtpError(
                f"the peer sent nothing for {self._peer_ttl:g} s (its heartbeat TTL): "
                "the connection is dead"
            )
        count = self._sock.recv_into(view)
        if count == 0:
            raise ZmtpError("the peer closed the connection")
        return count

    def close(self) -> None:
        """Close the socket; a thread blocked in `recv` gets `ZmtpError` (or an OSError)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):  # already disconnected: nothing to shut down
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
