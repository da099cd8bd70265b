"""The daemon: a ZeroMQ ROUTER socket in front of one warm engine.

Threads: the main thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe) and does
all routing; one worker thread runs jobs on the engine, one at a time, connections served round
robin (jobqueue.py); an engine that runs jobs on a cluster's workers (cluster.py) gets one worker
thread per cluster worker. One scanner thread rescans the model, LoRA and ControlNet folders
when a request needs it, and one reader thread answers `results` (reading saved PNGs), so that a
slow disk never stalls the socket. They hand their work back over inproc PUSH/PULL pairs, which
the main thread polls together with the ROUTER.

Jobs belong to connections, not to ZeroMQ routing ids: a peer may choose its routing id, and a
later connection claiming a departed one's id must not receive that one's results. libzmq's
socket monitor reports each TCP connection (by file descriptor) as it opens and closes, and every
message carries the descriptor it came in on; a ZAP handler admits connections (the token, the
connection limit) before they can send anything.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import __version__
from ..wire import protocol
from ..wire.protocol import ErrorCode, GenerateRequest, Limits, ProtocolError
from ..wire.zmtp import ZAP_FULL_REASON
from .engine import Engine, GeneratedImage, JobCancelled
from .images import check_images
from .jobqueue import FairQueue
from .outputs import OutputFolder, SavedImage, encode_png, rgba_bytes
from .results import ResultRecord, ResultsBudget, ResultsLog, owner_of
from .schedulers import SAMPLERS
from .security import LoginGuard

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 30_000
# How long the worker waits for the main thread to send a result before compressing its files.
RESULT_SENT_WAIT_S = 1.0
# Folder rescans (the `models` op, a name not in the last scan) run at most this often; requests
# in between are answered from the last scan.
RESCAN_INTERVAL_S = 1.0
# How long a closed connection's routing id is remembered: its last messages are read by then.
DEPARTED_MEMORY_S = 10.0
# Refused connections (max_connections) are logged at most this often.
FULL_LOG_INTERVAL_S = 60.0
# Messages handled per turn of the main loop before it looks at its other sockets again.
RECEIVE_BATCH = 64
# More messages than this in a second from one connection: no editor sends that many; the
# connection is closed (the daemon's memory would follow a faster sender, RCVHWM below).
MAX_MESSAGES_PER_S = 2000
# `results` answers to one address: a burst of this many largest messages' worth
# (limits.max_message_bytes), refilled over this many seconds.
RESULTS_BURST_MESSAGES = 2
RESULTS_REFILL_S = 8.0
CAPABILITIES = [
    "txt2img",
    "img2img",
    "inpaint",
    "preview",
    "cancel",
    "png",
    "models",
    "loras",
    "results",
    "live",
    "control",
]
# libzmq asks the socket bound here (in the same context) to admit each new connection (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"sdbridge"
# ZAP answers: 400 is "wrong credentials"; 500 here means "not now: too many connections".
ZAP_OK, ZAP_REFUSED, ZAP_FULL = b"200", b"400", ZAP_FULL_REASON.encode()
MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


@dataclass(eq=False)
class Connection:
    """One TCP connection of a peer, from its monitor event to its close."""

    serial: int
    fd: int
    # Learnt from its first message: the routing id the ROUTER knows it by, its IP address.
    routing_id: bytes | None = None
    address: str = ""
    open: bool = True
    # The digest of its `hello`'s session key (`owner_of`): its results, and earlier
    # connections' with the same key.
    owner: str | None = None
    live: Job | None = None  # its latest `live` job: a newer one supersedes it
    # Messages in the current one-second window, for the flood guard.
    window_start: float = 0.0
    window_count: int = 0


@dataclass(eq=False)
class Job:
    connection: Connection
    id: str
    request: GenerateRequest
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Who stopped it: the client ("client"), a newer live job ("superseded"), or the daemon
    # shutting down ("shutdown").
    cancel_reason: str = "client"
    running: bool = False
    # (step, total) once running; the total is known once the job's schedule is.
    progress: tuple[int, int | None] = (0, None)

    @property
    def key(self) -> tuple[int, str]:
        return (self.connection.serial, self.id)


class Daemon:
    def __init__(
        self,
        engine: Engine,
        outputs: OutputFolder,
        address: str = protocol.DEFAULT_ADDRESS,
        limits: Limits | None = None,
        heartbeat_ms: int = HEARTBEAT_IVL_MS,
        token: bytes | None = None,
        parallel_jobs: int = 1,
    ) -> None:
        """With a ``token`` every peer must log in with ZMTP PLAIN and that token as password;
        a peer that does not never reaches the ROUTER (libzmq answers it with ERROR).
        ``parallel_jobs``: how many jobs the engine runs at once (a cluster's workers), each on
        a worker thread of its own."""
        self.engine = engine
        self.address = address
        self.outputs = outputs
        self.limits = limits or Limits()
        self.token = token
        self.logins = LoginGuard()
        self._full_logged_at = float("-inf")
        # A context of its own: the ZAP endpoint is one per context.
        self.context = zmq.Context()
        # Bound before the ROUTER, so no peer can connect before admission is in place.
        self.zap = self.context.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.router = self.context.socket(zmq.ROUTER)
        if token is not None:
            self.router.setsockopt(zmq.PLAIN_SERVER, 1)
        self.router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)  # makes libzmq ask ZAP for NULL too
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        # No receive queue limit: libzmq 4.3 aborts the whole process (`!_io_error`, libzmq
        # issues #3937 and #4767) when a peer whose queue is full hangs up and a heartbeat or a
        # PING follows. The main loop reads far faster than a job-sized request can arrive.
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.router.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        self.monitor = self.router.get_monitor_socket(MONITOR_EVENTS)
        self.router.bind(address)
        self.events_in = self.context.socket(zmq.PULL)
        self._events_address = f"inproc://sdbridge-events-{id(self)}"
        self.events_in.bind(self._events_address)
        self.rescanned_in = self.context.socket(zmq.PULL)
        self._rescanned_address = f"inproc://sdbridge-rescanned-{id(self)}"
        self.rescanned_in.bind(self._rescanned_address)
        # Live connections by file descriptor, and every connection by serial (the worker's
        # events name it) until its last job ends.
        self.connections: dict[int, Connection] = {}
        self._serials = iter(range(1, 2**63))
        # Routing ids of recently closed connections (in order of closing): their messages may
        # still be read after their descriptor went to a new connection.
        self._departed: dict[bytes, float] = {}
        # Jobs by (connection serial, id); the queue holds the ones not yet started, `running`
        # the started ones in the order they started. All under one lock shared with the workers.
        self.lock = threading.Condition()
        self.jobs: dict[tuple[int, str], Job] = {}
        self.queue: FairQueue[Job] = FairQueue()
        self.running: list[Job] = []
        # Requests waiting for a folder rescan, and those rescanned, ready to be handled again.
        self.rescans: queue.SimpleQueue[tuple[Connection, dict[str, Any]]] = queue.SimpleQueue()
        self.rescanned: queue.SimpleQueue[tuple[Connection, dict[str, Any]]] = queue.SimpleQueue()
        # The saved images, and the `results` requests waiting for the reader thread.
        self.results = ResultsLog(outputs.root)
        self.results_budget = ResultsBudget(
            RESULTS_BURST_MESSAGES * self.limits.max_message_bytes, RESULTS_REFILL_S
        )  # the reader thread's
        self.reads: queue.SimpleQueue[tuple[Connection, str, protocol.ResultsQuery]] = (
            queue.SimpleQueue()
        )
        self.stopping = threading.Event()
        self.workers = [
            threading.Thread(target=self._work, name=f"sdbridge-worker-{n}", daemon=True)
            for n in range(parallel_jobs)
        ]
        self.scanner = threading.Thread(target=self._scan, name="sdbridge-scanner", daemon=True)
        self.reader = threading.Thread(target=self._read, name="sdbridge-reader", daemon=True)

    # --- main thread -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        for worker in self.workers:
            worker.start()
        self.scanner.start()
        self.reader.start()
        poller = zmq.Poller()
        for listened in (self.router, self.events_in, self.zap, self.monitor, self.rescanned_in):
            poller.register(listened, zmq.POLLIN)
        log.info("listening on %s%s", self.address, " (token required)" if self.token else "")
        while not self.stopping.is_set():
            ready = dict(poller.poll(200))
            # Connections first: a message or a login can only follow its connection's opening.
            self._watch_connections()
            if self.zap in ready:
                self._admit()
            if self.events_in in ready:
                self._forward_events()
            if self.rescanned_in in ready:
                self._handle_rescanned()
            if self.router in ready:
                self._receive()
        self._shut_down()

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def _watch_connections(self) -> None:
        """Apply the monitor's news: a connection opened or closed."""
        while True:
            try:
                news = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            fd = news["value"]
            if news["event"] == zmq.EVENT_ACCEPTED:
                self._close_connection(fd)  # a descriptor is reused only once closed
                self.connections[fd] = Connection(next(self._serials), fd)
            else:
                self._close_connection(fd)

    def _close_connection(self, fd: int) -> None:
        """The client is gone for good: its queued jobs are dropped; a running one finishes and
        is saved, but its events go nowhere (a new connection never gets them)."""
        connection = self.connections.pop(fd, None)
        if connection is None:
            return
        connection.open = False
        if connection.routing_id is not None:
            now = time.monotonic()
            self._departed[connection.routing_id] = now
            while now - next(iter(self._departed.values())) > DEPARTED_MEMORY_S:
                del self._departed[next(iter(self._departed))]
        with self.lock:
            dropped = self.queue.drop(connection.serial)
            for job in dropped:
                job.cancelled.set()
                del self.jobs[job.key]
        if dropped:
            log.info(
                "a client from %s left: dropped its %d queued jobs",
                connection.address,
                len(dropped),
            )

    def _admit(self) -> None:
        """Answer one ZAP request: version, request id, domain, address, identity, mechanism,
        then for PLAIN the username and password. Only the password (the token) counts."""
        request = self.zap.recv_multipart()
        request_id = request[1] if len(request) > 1 else b""
        address = request[3].decode("ascii", "replace") if len(request) > 3 else "?"
        well_formed = len(request) >= 6 and request[0] == b"1.0"
        if self.token is None:
            authorized = well_formed and request[5] == b"NULL"
        elif not well_formed or self.logins.locked_out(address):
            authorized = False
        else:
            authorized = (
                len(request) == 8
                and request[5] == b"PLAIN"
                and hmac.compare_digest(request[7], self.token)
            )
        if not authorized:
            if self.token is not None:
                self.logins.refused(address)
            status = (ZAP_REFUSED, b"wrong token")
        elif len(self.connections) > self.limits.max_connections:  # this one counted too
            now = time.monotonic()
            if now - self._full_logged_at >= FULL_LOG_INTERVAL_S:  # a storm logs a line a minute
                self._full_logged_at = now
                log.warning(
                    "refusing connections (from %s, ...): %d open already (max_connections)",
                    address,
                    self.limits.max_connections,
                )
            status = (ZAP_FULL, b"too many connections")
        else:
            status = (ZAP_OK, b"OK")
        self.zap.send_multipart([b"1.0", request_id, *status, b"", b""])

    def _forward_events(self) -> None:
        while True:
            try:
                frames = self.events_in.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            serial, job_id, terminal, payload = frames
            if not job_id.bytes:  # the reader's answer to a request, not a job's event
                self._forward_answer(int.from_bytes(serial.bytes, "big"), payload)
                continue
            key = (int.from_bytes(serial.bytes, "big"), job_id.bytes.decode())
            with self.lock:
                job = self.jobs.get(key)
                if terminal.bytes and job is not None:
                    del self.jobs[key]
            if job is not None and job.connection.open:
                self.router.send_multipart([job.connection.routing_id, payload], copy=False)
            if terminal.bytes:
                with self.lock:
                    self.lock.notify_all()  # a worker waits for its result to be sent

    def _forward_answer(self, serial: int, payload: zmq.Frame) -> None:
        for connection in self.connections.values():  # few: at most max_connections
            if connection.serial == serial:
                self.router.send_multipart([connection.routing_id, payload], copy=False)
                return

    def _send(self, connection: Connection, message: dict[str, Any]) -> None:
        if connection.open:
            self.router.send_multipart([connection.routing_id, protocol.pack(message)])

    def _receive(self) -> None:
        # A bounded batch: under a flood, logins and the worker's events still get their turn.
        for _ in range(RECEIVE_BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            connection = self._connection_of(frames)
            if connection is None or self._flooding(connection):
                continue
            if not _generated(connection.routing_id):
                # libzmq's own ids are unique; a chosen one could be a departed client's.
                refusal = ProtocolError(
                    ErrorCode.BAD_MESSAGE,
                    "the daemon takes no client-chosen ZeroMQ routing id: set no ROUTING_ID",
                )
                self._send(connection, protocol.error_event(None, refusal))
                continue
            body = frames[1:]
            message: dict[str, Any] = {}
            try:
                if len(body) != 1:
                    raise ProtocolError(
                        ErrorCode.BAD_MESSAGE,
                        f"a message must be exactly one frame, got {len(body)}",
                    )
                message = protocol.unpack(body[0].buffer)
                self._handle(connection, message)
            except Exception as exc:  # a bug handling one message must not take the daemon down
                self._refuse(connection, message, exc)

    def _flooding(self, connection: Connection) -> bool:
        """Count the message; a connection sending more than any editor would is cut off.

        libzmq reads every connection as fast as it can (see RCVHWM above), so a client that
        sends faster than the daemon answers would otherwise fill its memory."""
        now = time.monotonic()
        if now - connection.window_start >= 1.0:
            connection.window_start, connection.window_count = now, 0
        connection.window_count += 1
        if connection.window_count <= MAX_MESSAGES_PER_S:
            return False
        log.warning(
            "disconnected a client from %s: over %d messages a second",
            connection.address,
            MAX_MESSAGES_PER_S,
        )
        # Shutting the socket down makes libzmq see the peer gone and close its side cleanly;
        # closing the descriptor under it would not. Its queued messages are then stale.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(connection.fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self._close_connection(connection.fd)
        return True

    def _connection_of(self, frames: list[zmq.Frame]) -> Connection | None:
        """The connection a message came in on; None for a stale message of a closed one."""
        fd = frames[-1].get(zmq.SRCFD)
        routing_id = frames[0].bytes
        connection = self.connections.get(fd)
        if connection is None:  # its monitor event is late: libzmq sends it before the message
            self._watch_connections()
            connection = self.connections.get(fd)
        if connection is None:  # sent just before its connection closed: no one to answer
            return None
        if connection.routing_id is None:
            if routing_id in self._departed:  # a closed one's, read after its descriptor's reuse
                return None
            connection.routing_id = routing_id
            connection.address = frames[-1].get("Peer-Address") or ""
        elif connection.routing_id != routing_id:
            return None
        return connection

    def _refuse(self, connection: Connection, message: dict[str, Any], exc: Exception) -> None:
        """Answer a request that failed with one `error` event."""
        if isinstance(exc, ProtocolError):
            error = exc
        else:
            log.exception("failed to handle a message")
            error = ProtocolError(ErrorCode.INTERNAL, f"the daemon failed on it: {exc}")
        # A duplicate's id is the live job's: an error under it would read as that job's end.
        rid = None if error.code == ErrorCode.DUPLICATE_ID else protocol.request_id(message)
        self._send(connection, protocol.error_event(rid, error))

    def _handle(
        self, connection: Connection, message: dict[str, Any], rescanned: bool = False
    ) -> None:
        """Answer one request. ``rescanned``: the folders were just rescanned for it."""
        op, rid = protocol.validate_envelope(message)
        if op == "hello":
            session = protocol.validate_hello(message)
            if session is not None:
                connection.owner = owner_of(session)
            self._send(connection, self._hello(rid))
        elif op == "status":
            self._send(connection, self._status(connection, rid))
        elif op == "models":
            if rescanned:
                self._send(connection, self._models(rid))
            else:
                self.rescans.put((connection, message))
        elif op == "cancel":
            self._cancel(connection, rid, protocol.validate_cancel(message))
        elif op == "results":
            self.reads.put((connection, rid, protocol.validate_results(message)))
        else:
            request = protocol.validate_generate(message, self.limits)
            try:
                self.engine.check(request, self.limits.max_pixels)
            except ProtocolError as error:
                unknown = error.code in (
                    ErrorCode.UNKNOWN_MODEL,
                    ErrorCode.UNKNOWN_LORA,
                    ErrorCode.UNKNOWN_CONTROLNET,
                )
                if rescanned or not unknown:
                    raise
                self.rescans.put((connection, message))  # perhaps downloaded since the last scan
                return
            self._submit(connection, rid, request)

    def _handle_rescanned(self) -> None:
        while True:
            try:
                self.rescanned_in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            connection, message = self.rescanned.get()
            try:
                self._handle(connection, message, rescanned=True)
            except Exception as exc:
                self._refuse(connection, message, exc)

    def _hello(self, rid: str) -> dict[str, Any]:
        engine = self.engine
        return protocol.event(
            "hello",
            rid,
            server=__version__,
            protocol=list(protocol.SUPPORTED_VERSIONS),
            device=engine.device.type,
            dtype=str(engine.dtype).removeprefix("torch."),
            model=engine.model,
            models=engine.models.registry.names(),
            native_size=[engine.native_size, engine.native_size],
            schedulers=list(SAMPLERS),
            loras=[entry.name for entry in engine.loras.entries()],
            controlnets=[entry.name for entry in engine.controlnets.entries()],
            preprocessors=list(protocol.PREPROCESSORS),
            capabilities=CAPABILITIES,
            limits=self.limits.to_dict(),
        )

    def _models(self, rid: str) -> dict[str, Any]:
        """Every listed model, LoRA and ControlNet, from the scan made for this request."""
        engine = self.engine
        loaded = set(engine.models.loaded_names())
        models = [
            {
                **entry.to_dict(entry.name in loaded),
                "defaults": engine.models.defaults(entry.name).to_dict(),
            }
            for entry in engine.models.registry.entries()
        ]
        return protocol.event(
            "models",
            rid,
            model=engine.model,
            models=models,
            loras=[entry.to_dict() for entry in engine.loras.entries()],
            controlnets=[entry.to_dict() for entry in engine.controlnets.entries()],
        )

    def _status(self, connection: Connection, rid: str) -> dict[str, Any]:
        with self.lock:
            waiting = [*self.running, *self.queue]
            queue = [
                {
                    "id": job.id if job.connection is connection else None,
                    "state": "running" if job.running else "queued",
                    "position": position,
                    "mine": job.connection is connection,
                }
                for position, job in enumerate(waiting)
            ]
            running = None
            if self.running:  # the job that started first
                step, total = self.running[0].progress
                running = {"step": step, "total": total}
        return protocol.event(
            "status",
            rid,
            device=self.engine.device.type,
            dtype=str(self.engine.dtype).removeprefix("torch."),
            model=self.engine.model,
            queue=queue,
            running=running,
        )

    def _submit(self, connection: Connection, rid: str, request: GenerateRequest) -> None:
        # The cheap refusals first: decoding its images can take a while. Only this thread
        # adds jobs, so there is still room after the decode.
        # A live job replaces the connection's previous one, which then counts for nothing.
        superseded = connection.live if request.live else None
        with self.lock:
            self._check_room(connection, rid, superseded)
        check_images(request)  # its PNGs decode, before `accepted`
        with self.lock:
            dropped = superseded is not None and self._supersede(superseded)
            job = Job(connection, rid, request)
            self.jobs[job.key] = job
            position = self.queue.push(connection.serial, job) + len(self.running)
            if request.live:
                connection.live = job
            self.lock.notify_all()
        if dropped:
            self._send(connection, protocol.event("cancelled", superseded.id, reason="superseded"))
        self._send(connection, protocol.event("accepted", rid, position=position))

    def _supersede(self, job: Job) -> bool:
        """Stop a live job a newer one replaces (under the lock): a queued one is dropped (True:
        its `cancelled` is for the caller to send), a running one stops at its next step."""
        if self.jobs.get(job.key) is not job:
            return False  # it has ended
        job.cancel_reason = "superseded"
        job.cancelled.set()
        if job.running:
            return False
        self.queue.remove(job.connection.serial, job)
        del self.jobs[job.key]
        return True

    def _check_room(self, connection: Connection, rid: str, superseded: Job | None) -> None:
        """Refuse a duplicate id, or a job over the queue's limits (under the lock); a live
        job about to be superseded does not count."""
        if (connection.serial, rid) in self.jobs:
            raise ProtocolError(
                ErrorCode.DUPLICATE_ID, f"a job with id {rid!r} is still live", "id"
            )
        # Live jobs count, queued or running, of every connection from the same address:
        # one client cannot hold the daemon alone by opening more connections.
        mine = sum(
            1
            for job in self.jobs.values()
            if job.connection.address == connection.address and job is not superseded
        )
        if mine >= self.limits.max_queue_per_client:
            raise ProtocolError(
                ErrorCode.BUSY,
                f"your address already has {mine} live jobs, the most allowed "
                f"(max_queue_per_client); wait for one to finish",
            )
        queued = len(self.queue) - (superseded is not None and not superseded.running)
        if queued >= self.limits.max_queue:
            raise ProtocolError(
                ErrorCode.BUSY,
                f"the queue is full ({self.limits.max_queue} jobs); try again later",
            )

    def _cancel(self, connection: Connection, rid: str, job_id: str) -> None:
        with self.lock:
            job = self.jobs.get((connection.serial, job_id))
            if job is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_JOB, f"no live job {job_id!r} on this connection", "job"
                )
            job.cancelled.set()
            state = "running" if job.running else "queued"
            if not job.running:
                self.queue.remove(connection.serial, job)
                del self.jobs[job.key]
        self._send(connection, protocol.event("cancel", rid, job=job_id, state=state))
        if state == "queued":
            self._send(connection, protocol.event("cancelled", job_id, reason=job.cancel_reason))

    def _shut_down(self) -> None:
        """Answer every queued job, let the running ones stop at their next step, then close."""
        with self.lock:
            queued = self.queue.clear()
            for job in queued:
                del self.jobs[job.key]
            for job in self.running:
                job.cancel_reason = "shutdown"
                job.cancelled.set()
            self.lock.notify_all()
        for job in queued:
            self._send(job.connection, protocol.event("cancelled", job.id, reason="shutdown"))
        deadline = time.monotonic() + 60
        for worker in self.workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self.scanner.join(timeout=5)
        self.reader.join(timeout=5)
        self._forward_events()
        self.router.disable_monitor()
        for closing in (self.router, self.monitor, self.events_in, self.rescanned_in, self.zap):
            closing.close(linger=1000 if closing is self.router else 0)
        # A thread still running holds a socket open, and term() would wait for it.
        if not any(thread.is_alive() for thread in (*self.workers, self.scanner, self.reader)):
            self.context.term()

    # --- scanner thread ----------------------------------------------------------------------

    def _scan(self) -> None:
        """Rescan the folders for the requests that need it, at most once per interval, and hand
        them back to the main thread."""
        wake = self.context.socket(zmq.PUSH)
        wake.connect(self._rescanned_address)
        last_scan = float("-inf")
        try:
            while not self.stopping.is_set():
                try:
                    waiting = [self.rescans.get(timeout=0.5)]
                except queue.Empty:
                    continue
                if time.monotonic() - last_scan >= RESCAN_INTERVAL_S:
                    try:
                        self.engine.rescan()
                    except Exception:  # the last scan stands; the daemon must go on
                        log.exception("rescanning the model folders failed")
                    last_scan = time.monotonic()
                while True:  # everything asked for meanwhile is answered by this scan too
                    try:
                        waiting.append(self.rescans.get_nowait())
                    except queue.Empty:
                        break
                for item in waiting:
                    self.rescanned.put(item)
                    wake.send(b"")
        finally:
            wake.close(linger=0)

    # --- reader thread -----------------------------------------------------------------------

    def _read(self) -> None:
        """Answer `results` requests: their images are read from disk, off the main thread."""
        self.results.restore()  # earlier runs' results: `results` waits for them
        out = self.context.socket(zmq.PUSH)
        out.connect(self._events_address)
        try:
            while not self.stopping.is_set():
                try:
                    connection, rid, query = self.reads.get(timeout=0.5)
                except queue.Empty:
                    continue
                route = connection.serial.to_bytes(8, "big")
                answer = self._results(connection, rid, query)
                out.send_multipart([route, b"", b"", protocol.pack(answer)])
        finally:
            out.close(linger=-1)

    def _results(
        self, connection: Connection, rid: str, query: protocol.ResultsQuery
    ) -> dict[str, Any]:
        wait = self.results_budget.wait(connection.address)
        if wait > 0:
            busy = ProtocolError(
                ErrorCode.BUSY,
                f"this address had more results than the daemon sends at once; ask again in "
                f"{wait:.1f} s",
            )
            return protocol.error_event(rid, busy)
        try:
            fields = self.results.page(
                query,
                lambda record: self.token is None or self._owns(connection, record),
                lambda record: self._owns(connection, record),
            )
        except Exception as exc:  # the daemon must go on
            log.exception("answering results failed")
            error = ProtocolError(ErrorCode.INTERNAL, f"the daemon failed on it: {exc}")
            return protocol.error_event(rid, error)
        answer = protocol.event("results", rid, **fields)
        self.results_budget.spend(connection.address, sum(map(_answer_bytes, fields["results"])))
        return answer

    @staticmethod
    def _owns(connection: Connection, record: ResultRecord) -> bool:
        """Whether the connection, or one with its session key, made the result. With a token
        a connection sees only those; without one (the daemon then listens on loopback only)
        it sees every result, its own marked `mine`."""
        if record.connection == connection.serial:
            return True
        mine, theirs = connection.owner, record.owner
        return mine is not None and theirs is not None and hmac.compare_digest(mine, theirs)

    # --- worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        out = self.context.socket(zmq.PUSH)
        out.connect(self._events_address)
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                self._run(job, out)
        finally:
            out.close(linger=-1)

    def _next_job(self) -> Job | None:
        with self.lock:
            while not self.queue:
                if self.stopping.is_set():
                    return None
                self.lock.wait(0.5)
            job = self.queue.pop()
            job.running = True
            self.running.append(job)
            return job

    def _run(self, job: Job, out: zmq.Socket) -> None:
        route = [job.connection.serial.to_bytes(8, "big"), job.id.encode()]

        def emit(message: dict[str, Any], terminal: bool = False) -> None:
            out.send_multipart([*route, b"\x01" if terminal else b"", protocol.pack(message)])

        start = time.perf_counter()
        emit(protocol.event("started", job.id))

        def on_progress(step: int, total: int) -> None:
            job.progress = (step, total)
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (total - step)
            emit(
                protocol.event("progress", job.id, step=step, total=total, elapsed=elapsed, eta=eta)
            )

        def on_loading(model: str) -> None:
            emit(protocol.event("loading", job.id, model=model))

        def on_preview(step: int, total: int, image: protocol.Image) -> None:
            emit(protocol.event("preview", job.id, step=step, total=total, image=image.to_dict()))

        saved: list[SavedImage] = []
        try:
            images = self.engine.run(
                job.request,
                on_progress,
                on_preview,
                job.cancelled.is_set,
                on_loading,
                max_pixels=self.limits.max_pixels,
            )
            result, saved = self._result(job, images, time.perf_counter() - start)
            emit(result, terminal=True)
        except JobCancelled:
            emit(protocol.event("cancelled", job.id, reason=job.cancel_reason), terminal=True)
        except ProtocolError as error:
            emit(protocol.error_event(job.id, error), terminal=True)
        except Exception as exc:  # the daemon must outlive any failure inside a pipeline
            log.exception("job %s failed", job.id)
            error = ProtocolError(ErrorCode.INTERNAL, f"the job failed: {exc}")
            emit(protocol.error_event(job.id, error), terminal=True)
        finally:
            with self.lock:
                self.running.remove(job)
        # The files exist. Compress them once the result is handed to ZeroMQ, so that on a busy
        # machine compressing never holds up its delivery: it delays only the next job.
        if saved:
            with self.lock:
                self.lock.wait_for(lambda: job.key not in self.jobs, timeout=RESULT_SENT_WAIT_S)
        for image in saved:
            self.outputs.compress(image)

    def _result(
        self, job: Job, images: list[GeneratedImage], elapsed: float
    ) -> tuple[dict[str, Any], list[SavedImage]]:
        encoded, saved = [], []
        for index, generated in enumerate(images):
            image = generated.image
            raw = job.request.output_format == "raw"
            rgba = rgba_bytes(image) if raw else None
            path = None
            if job.request.live:  # a sketch of the moment: neither saved nor listed
                data = rgba if raw else encode_png(np.asarray(image.convert("RGB")), {}, True)
            else:
                # A full or read-only output folder costs the client only the copy on disk.
                stored = self.outputs.save(image, generated.info, rgba)
                saved.append(stored)
                data, path = rgba if raw else stored.png, stored.path
                asker = job.connection
                self.results.add(
                    job.id, index, image, generated.info, path, asker.serial, asker.owner
                )
            encoded.append(
                {
                    "width": image.width,
                    "height": image.height,
                    "format": job.request.output_format,
                    "data": data,
                    "seed": generated.seed,
                    "path": None if path is None else str(path),
                    "parameters": generated.info.to_parameters(),
                }
            )
        result = protocol.event(
            "result",
            job.id,
            images=encoded,
            parameters=images[0].info.to_parameters(),
            elapsed=elapsed,
            warning=next((image.warning for image in saved if image.warning), None),
        )
        return result, saved


def _generated(routing_id: bytes | None) -> bool:
    """Whether libzmq's ROUTER made this routing id (a zero byte, then a 32-bit counter)."""
    return routing_id is not None and len(routing_id) == 5 and routing_id[0] == 0


def _answer_bytes(entry: dict[str, Any]) -> int:
    """What a `results` entry weighs on the wire: its images, and a little for the rest."""
    image = entry["image"]
    return 1024 + len(entry["thumbnail"]["data"]) + (len(image["data"]) if image else 0)
