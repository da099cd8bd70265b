"""The daemon: a ZeroMQ ROUTER socket in front of one warm engine.

Threads: the main thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe) and does
all routing; one worker thread runs jobs on the engine, one at a time, in order of arrival.
The worker hands events back over an inproc PUSH/PULL pair, which the main thread polls together
with the ROUTER: no polling intervals, no copies of result images on the way out.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import __version__, protocol
from .engine import Engine, GeneratedImage, JobCancelled
from .outputs import OutputFolder, SavedImage, rgba_bytes
from .protocol import ErrorCode, GenerateRequest, Limits, ProtocolError
from .schedulers import SAMPLERS

log = logging.getLogger("sdbridge.daemon")

HEARTBEAT_IVL_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 30_000
# How long the worker waits for the main thread to send a result before compressing its files.
RESULT_SENT_WAIT_S = 1.0
CAPABILITIES = ["txt2img", "img2img", "inpaint", "preview", "cancel", "png", "models", "loras"]
# libzmq asks the socket bound here (in the same context) to authenticate PLAIN peers (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"sdbridge"


@dataclass(eq=False)
class Job:
    peer: bytes
    id: str
    request: GenerateRequest
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Who stopped it: the client ("client") or the daemon shutting down ("shutdown").
    cancel_reason: str = "client"
    running: bool = False

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.peer, self.id)


class Daemon:
    def __init__(
        self,
        engine: Engine,
        outputs: OutputFolder,
        address: str = protocol.DEFAULT_ADDRESS,
        limits: Limits | None = None,
        heartbeat_ms: int = HEARTBEAT_IVL_MS,
        token: bytes | None = None,
    ) -> None:
        """With a ``token`` every peer must log in with ZMTP PLAIN and that token as password;
        a peer that does not never reaches the ROUTER (libzmq answers it with ERROR)."""
        self.engine = engine
        self.address = address
        self.outputs = outputs
        self.limits = limits or Limits()
        self.token = token
        self.context = zmq.Context.instance()
        self.zap: zmq.Socket | None = None
        if token is not None:
            # Bound before the ROUTER, so no peer can connect before authentication is in place.
            self.zap = self.context.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
        self.router = self.context.socket(zmq.ROUTER)
        if token is not None:
            self.router.setsockopt(zmq.PLAIN_SERVER, 1)
            self.router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.router.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        self.router.bind(address)
        inproc = f"inproc://sdbridge-events-{id(self)}"
        self.events_in = self.context.socket(zmq.PULL)
        self.events_in.bind(inproc)
        self._events_out_address = inproc
        # Jobs by (peer, id); the queue holds the ones not yet started. Both under one lock.
        self.lock = threading.Condition()
        self.jobs: dict[tuple[bytes, str], Job] = {}
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.progress: tuple[int, int] | None = None
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self._work, name="sdbridge-worker", daemon=True)

    # --- main thread -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self.worker.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.events_in, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap, zmq.POLLIN)
        log.info("listening on %s%s", self.address, " (token required)" if self.token else "")
        while not self.stopping.is_set():
            ready = dict(poller.poll(200))
            if self.zap is not None and self.zap in ready:
                self._authenticate()
            if self.events_in in ready:
                self._forward_events()
            if self.router in ready:
                self._receive()
        self._shut_down()

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def _authenticate(self) -> None:
        """Answer one ZAP request: version, request id, domain, address, identity, mechanism,
        then for PLAIN the username and password. Only the password (the token) counts."""
        assert self.zap is not None and self.token is not None
        request = self.zap.recv_multipart()
        request_id = request[1] if len(request) > 1 else b""
        allowed = (
            len(request) == 8
            and request[0] == b"1.0"
            and request[5] == b"PLAIN"
            and hmac.compare_digest(request[7], self.token)
        )
        if not allowed:
            log.warning("refused a peer from %s: wrong or missing token", _zap_address(request))
        status = (b"200", b"OK") if allowed else (b"400", b"wrong token")
        self.zap.send_multipart([b"1.0", request_id, *status, b"", b""])

    def _forward_events(self) -> None:
        while True:
            try:
                peer, terminal, payload = self.events_in.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            terminal_event = terminal.bytes != b"\x00"
            if terminal_event:
                with self.lock:
                    self.jobs.pop((peer.bytes, terminal.bytes.decode()), None)
            self.router.send_multipart([peer, payload], copy=False)
            if terminal_event:
                with self.lock:
                    self.lock.notify_all()  # the worker waits for its result to be sent

    def _send(self, peer: bytes, message: dict[str, Any]) -> None:
        self.router.send_multipart([peer, protocol.pack(message)])

    def _receive(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer, body = frames[0], frames[1:]
            message: dict[str, Any] = {}
            try:
                if len(body) != 1:
                    raise ProtocolError(
                        ErrorCode.BAD_MESSAGE,
                        f"a message must be exactly one frame, got {len(body)}",
                    )
                message = protocol.unpack(body[0])
                self._handle(peer, message)
            except ProtocolError as error:
                self._send(peer, protocol.error_event(protocol.request_id(message), error))
            except Exception as exc:  # a bug handling one message must not take the daemon down
                log.exception("failed to handle a message")
                error = ProtocolError(ErrorCode.INTERNAL, f"the daemon failed on it: {exc}")
                self._send(peer, protocol.error_event(protocol.request_id(message), error))

    def _handle(self, peer: bytes, message: dict[str, Any]) -> None:
        op, rid = protocol.validate_envelope(message)
        if op == "hello":
            self._send(peer, self._hello(rid))
        elif op == "status":
            self._send(peer, self._status(peer, rid))
        elif op == "models":
            self._send(peer, self._models(rid))
        elif op == "cancel":
            self._cancel(peer, rid, protocol.validate_cancel(message))
        else:
            self._submit(peer, rid, protocol.validate_generate(message, self.limits))

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
            models=engine.registry.names(),
            native_size=[engine.native_size, engine.native_size],
            schedulers=list(SAMPLERS),
            loras=[entry.name for entry in engine.loras.entries()],
            capabilities=CAPABILITIES,
            limits=self.limits.to_dict(),
        )

    def _models(self, rid: str) -> dict[str, Any]:
        """Every listed model and LoRA, the folders rescanned: new downloads appear here."""
        engine = self.engine
        engine.registry.refresh()
        engine.loras.refresh()
        loaded = set(engine.loaded_names())
        models = [
            {
                **entry.to_dict(entry.name in loaded),
                "defaults": engine.defaults(entry.name).to_dict(),
            }
            for entry in engine.registry.entries()
        ]
        loras = [entry.to_dict() for entry in engine.loras.entries()]
        return protocol.event("models", rid, model=engine.model, models=models, loras=loras)

    def _status(self, peer: bytes, rid: str) -> dict[str, Any]:
        with self.lock:
            waiting = [self.current, *self.queue] if self.current else list(self.queue)
            queue = [
                {
                    "id": job.id if job.peer == peer else None,
                    "state": "running" if job.running else "queued",
                    "position": position,
                    "mine": job.peer == peer,
                }
                for position, job in enumerate(waiting)
            ]
            running = None
            if self.progress:
                running = {"step": self.progress[0], "total": self.progress[1]}
        return protocol.event(
            "status",
            rid,
            device=self.engine.device.type,
            dtype=str(self.engine.dtype).removeprefix("torch."),
            model=self.engine.model,
            queue=queue,
            running=running,
        )

    def _submit(self, peer: bytes, rid: str, request: GenerateRequest) -> None:
        self.engine.check(request)
        with self.lock:
            if (peer, rid) in self.jobs:
                raise ProtocolError(
                    ErrorCode.DUPLICATE_ID, f"a job with id {rid!r} is still live", "id"
                )
            # Live jobs count, queued or running: one connection cannot hold the daemon alone.
            mine = sum(1 for job in self.jobs.values() if job.peer == peer)
            if mine >= self.limits.max_queue_per_client:
                raise ProtocolError(
                    ErrorCode.BUSY,
                    f"this connection already has {mine} live jobs, the most allowed "
                    f"(max_queue_per_client); wait for one to finish",
                )
            if len(self.queue) >= self.limits.max_queue:
                raise ProtocolError(
                    ErrorCode.BUSY,
                    f"the queue is full ({self.limits.max_queue} jobs); try again later",
                )
            job = Job(peer, rid, request)
            self.jobs[job.key] = job
            self.queue.append(job)
            position = len(self.queue) - 1 + (1 if self.current else 0)
            self.lock.notify()
        self._send(peer, protocol.event("accepted", rid, position=position))

    def _cancel(self, peer: bytes, rid: str, job_id: str) -> None:
        with self.lock:
            job = self.jobs.get((peer, job_id))
            if job is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_JOB, f"no live job {job_id!r} on this connection", "job"
                )
            job.cancelled.set()
            queued = not job.running
            if queued:
                self.queue.remove(job)
                del self.jobs[job.key]
        if queued:
            self._send(peer, protocol.event("cancelled", job_id, reason=job.cancel_reason))

    def _shut_down(self) -> None:
        """Answer every queued job, let the running one stop at its next step, then close."""
        with self.lock:
            queued = list(self.queue)
            self.queue.clear()
            for job in queued:
                del self.jobs[job.key]
            if self.current:
                self.current.cancel_reason = "shutdown"
                self.current.cancelled.set()
            self.lock.notify()
        for job in queued:
            self._send(job.peer, protocol.event("cancelled", job.id, reason="shutdown"))
        self.worker.join(timeout=60)
        self._forward_events()
        self.router.close(linger=1000)
        self.events_in.close()
        if self.zap is not None:
            self.zap.close()

    # --- worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        out = self.context.socket(zmq.PUSH)
        out.connect(self._events_out_address)
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
            job = self.queue.popleft()
            job.running = True
            self.current = job
            self.progress = (0, job.request.num_inference_steps or 0)
            return job

    def _run(self, job: Job, out: zmq.Socket) -> None:
        def emit(message: dict[str, Any], terminal: bool = False) -> None:
            flag = job.id.encode() if terminal else b"\x00"
            out.send_multipart([job.peer, flag, protocol.pack(message)])

        start = time.perf_counter()
        emit(protocol.event("started", job.id))

        def on_progress(step: int, total: int) -> None:
            self.progress = (step, total)
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
                job.request, on_progress, on_preview, job.cancelled.is_set, on_loading
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
                self.current = None
                self.progress = None
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
        for generated in images:
            image = generated.image
            raw = job.request.output_format == "raw"
            rgba = rgba_bytes(image) if raw else None
            stored = self.outputs.save(image, generated.info, rgba)
            saved.append(stored)
            encoded.append(
                {
                    "width": image.width,
                    "height": image.height,
                    "format": job.request.output_format,
                    "data": rgba if raw else stored.png,
                    "seed": generated.seed,
                    "path": str(stored.path),
                }
            )
        result = protocol.event(
            "result",
            job.id,
            images=encoded,
            parameters=images[0].info.to_parameters(),
            elapsed=elapsed,
        )
        return result, saved


def _zap_address(request: list[bytes]) -> str:
    return request[3].decode("ascii", "replace") if len(request) > 3 else "an unknown address"
