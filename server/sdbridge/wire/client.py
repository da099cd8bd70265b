"""The pure-Python sdbridge client: one connection, a reader thread, jobs and their events.

Bundled into the Krita and GIMP plugins, so it needs only the standard library and msgpack.
A background thread reads the socket all the time (the daemon's heartbeats need answers even
when the plugin is idle), routes each event by its `id` to its `Job` or pending call, and
reconnects after the daemon goes away. Events are dicts exactly as on the wire (protocol.md).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

from .. import __version__
from .protocol import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    MAX_ID_CHARS,
    MIN_SESSION_CHARS,
    PROTOCOL_VERSION,
    TERMINAL_EVENTS,
    TOKEN_ENV,
    TOKEN_USERNAME,
    ErrorCode,
    Image,
    Limits,
    ProtocolError,
    error_event,
    pack,
    unpack,
)
from .zmtp import (
    Frame,
    ZmtpAuthError,
    ZmtpConnection,
    ZmtpError,
    ZmtpFullError,
    parse_address,
)

__all__ = [
    "Client",
    "ClientError",
    "ClientTimeout",
    "Disconnected",
    "Job",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "Link",
    "new_session_key",
    "resolve_address",
]

JobEvent: TypeAlias = dict[str, Any]
EventCallback: TypeAlias = Callable[[JobEvent], None]
StateCallback: TypeAlias = Callable[[bool, str], None]
LinkCallback: TypeAlias = Callable[["Link", str], None]

DEFAULT_CLIENT_NAME = f"sdbridge-client/{__version__}"
# A loopback daemon answers a connect at once; this only bounds a peer that accepts and stalls.
CONNECT_TIMEOUT = 5.0
RECONNECT_MIN_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0
# A daemon that refused the token will refuse it again until someone changes a token: retry
# slowly, so a forgotten editor does not fill the daemon's log.
AUTH_RETRY_DELAY = 10.0
_RESERVED_FIELDS = frozenset({"v", "op", "id"})

_log = logging.getLogger(__name__)


def new_session_key() -> str:
    """A random session key for `Client(session=...)`: 128 bits, as 32 hex digits."""
    return os.urandom(16).hex()


def resolve_address(address: str | None = None) -> str:
    """Where a `Client` connects: `address`, else ``$SDBRIDGE_ADDRESS``, else the default."""
    return address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


class Link(enum.Enum):
    """The state of the connection, for a front-end to act on without reading `state_message`."""

    CONNECTING = "connecting"  # the first attempt has not finished
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"  # no daemon there, or it went away: retried every 0.1-2 s
    FULL = "full"  # the daemon has limits.max_connections open: retried every 0.1-2 s
    TOKEN_REFUSED = "token_refused"  # it refused our token: retried every 10 s
    TOKEN_REQUIRED = "token_required"  # it wants a token and we have none
    TOKEN_UNEXPECTED = "token_unexpected"  # we have a token and it takes none
    CLOSED = "closed"  # `close()` was called

    @property
    def needs_token_change(self) -> bool:
        """Only another token (or none) helps: retrying as we are is refused again."""
        return self in (Link.TOKEN_REFUSED, Link.TOKEN_REQUIRED, Link.TOKEN_UNEXPECTED)


class ClientError(Exception):
    """A request or job that did not succeed; `code` is a protocol error code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class JobFailed(ClientError):
    """The job ended with an `error` event (its `event` attribute holds it)."""

    def __init__(self, event: JobEvent) -> None:
        super().__init__(
            str(event.get("code", ErrorCode.INTERNAL)),
            str(event.get("message", "the job failed")),
            event.get("field"),
        )
        self.event = event


class JobCancelled(ClientError):
    """The job ended with a `cancelled` event."""


class ClientTimeout(ClientError, TimeoutError):
    """No answer within the timeout; code `timeout`. A job that timed out is still live."""


class Disconnected(ClientError, ConnectionError):
    """No connection to the daemon (not running, restarted, or the client was closed)."""


class Job:
    """One `generate` request and the events the daemon sends about it."""

    def __init__(self, client: Client, job_id: str, request: JobEvent) -> None:
        self.id = job_id
        self.request = request
        self._client = client
        self._events: list[JobEvent] = []
        self._terminal: JobEvent | None = None
        self._subscribers: list[_Subscriber] = []
        # One thread at a time hands out events to subscribers (see `_pump`).
        self._pumping = False
        self._changed = threading.Condition()  # guards the fields above

    def __repr__(self) -> str:
        return f"<Job {self.id} {'done' if self.done else 'live'}>"

    @property
    def done(self) -> bool:
        """True once the terminal event (result, error or cancelled) has arrived."""
        with self._changed:
            return self._terminal is not None

    def subscribe(self, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every event of the job, in order, from the first.

        Live events come on the client's reader thread; the events that arrived before
        subscribing are replayed on the calling thread (with any that arrive meanwhile, so
        the order holds). A callback on the reader thread must not wait for this client.
        """
        with self._changed:
            self._subscribers.append(_Subscriber(callback))
            if self._pumping:
                return
            self._pumping = True
        self._pump()

    def events(self, timeout: float | None = None) -> Iterator[JobEvent]:
        """Yield every event (from the first) until the terminal one.

        Raises `ClientTimeout` if the terminal event has not come ``timeout`` seconds after the
        call (None: wait as long as it takes; a lost connection still ends the job).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        index = 0
        while True:
            event = self._wait_for(index, deadline, timeout)
            index += 1
            yield event
            if event.get("event") in TERMINAL_EVENTS:
                return

    def wait(self, timeout: float | None = None) -> JobEvent:
        """The terminal event, whatever it is; raises `ClientTimeout` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait_for(None, deadline, timeout)

    def result(self, timeout: float | None = None) -> JobEvent:
        """The `result` event; raises `JobFailed`, `JobCancelled` or `ClientTimeout`."""
        event = self.wait(timeout)
        kind = event.get("event")
        if kind == "result":
            return event
        if kind == "cancelled":
            raise JobCancelled("cancelled", f"job {self.id} was cancelled")
        raise JobFailed(event)

    def cancel(self) -> None:
        """Ask the daemon to stop the job; its terminal event will be `cancelled`.

        Does nothing if the job is already done or the connection is gone (then the job ends
        with `connection_lost` anyway).
        """
        if not self.done:
            self._client._cancel(self.id)

    def _wait_for(
        self, index: int | None, deadline: float | None, timeout: float | None
    ) -> JobEvent:
        """Event number ``index``, or the terminal event when ``index`` is None."""
        with self._changed:
            while True:
                if index is None and self._terminal is not None:
                    return self._terminal
                if index is not None and index < len(self._events):
                    return self._events[index]
                self._client._refuse_on_reader_thread("wait for a job")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ClientTimeout(
                        ErrorCode.TIMEOUT,
                        f"job {self.id} did not finish within {timeout:g} s "
                        "(it is still live: cancel() it to stop it)",
                    )
                self._changed.wait(remaining)

    def _deliver(self, event: JobEvent) -> None:
        with self._changed:
            if self._terminal is not None:
                return  # exactly one terminal event, even if a late one follows
            self._events.append(event)
            if event.get("event") in TERMINAL_EVENTS:
                self._terminal = event
            self._changed.notify_all()
            if self._pumping:
                return  # the thread that is pumping hands this one out too
            self._pumping = True
        self._pump()

    def _pump(self) -> None:
        """Hand out every event each subscriber has not had yet, calling back without a lock.

        Only one thread pumps at a time, so callbacks see events in order, and a callback that
        blocks during a replay never holds up the reader thread.
        """
        while True:
            with self._changed:
                pending = next(
                    (s for s in self._subscribers if s.delivered < len(self._events)), None
                )
                if pending is None:
                    self._pumping = False
                    return
                event = self._events[pending.delivered]
                pending.delivered += 1
            _call_back(pending.callback, event)


@dataclass
class _Subscriber:
    callback: EventCallback
    delivered: int = 0  # how many of the job's events it has been given


def _call_back(callback: Callable[..., None], *args: Any) -> None:
    # A plugin's bug must not kill the reader thread (that would stop heartbeats and events).
    try:
        callback(*args)
    except Exception:
        _log.exception("sdbridge client callback %r failed", callback)


class Client:
    """A connection to the sdbridge daemon that keeps itself up.

    ``address`` defaults to ``$SDBRIDGE_ADDRESS``, then ``tcp://127.0.0.1:7878``; ``token``
    (the daemon's secret, needed when it requires one) defaults to ``$SDBRIDGE_TOKEN``. ``timeout``
    bounds `hello` and `status` (and connecting). The first connection attempt happens in the
    constructor, which never raises for an absent daemon: requests then raise `Disconnected`
    while the reader thread keeps retrying (0.1 s .. 2 s apart). ``on_state(connected, message)``
    is called each time `link` changes (the connection comes up, goes down, or fails for
    another reason): for the first attempt on the constructing thread, then on the reader thread.
    ``on_link(link, message)`` likewise, with the `Link` that says why. ``session``: a secret
    key (16-128 chars, `new_session_key`) sent in a `hello` on every connection, so that `results`
    lists this client's results from its earlier connections too.
    """

    def __init__(
        self,
        address: str | None = None,
        timeout: float = 30.0,
        client_name: str = DEFAULT_CLIENT_NAME,
        on_state: StateCallback | None = None,
        token: str | bytes | None = None,
        on_link: LinkCallback | None = None,
        session: str | None = None,
    ) -> None:
        self.address = resolve_address(address)
        parse_address(self.address)  # a malformed address is a caller's bug: say so now
        token = token or os.environ.get(TOKEN_ENV) or None
        if isinstance(token, str):
            token = token.encode()
        if token is not None and len(token) > 255:
            raise ValueError("an sdbridge token is at most 255 bytes")
        self._plain = (TOKEN_USERNAME, token) if token else None
        if session is not None and not MIN_SESSION_CHARS <= len(session) <= MAX_ID_CHARS:
            raise ValueError(f"a session key is {MIN_SESSION_CHARS}..{MAX_ID_CHARS} characters")
        self.session = session
        self.timeout = timeout
        self.client_name = client_name
        self._on_state = on_state
        self._on_link = on_link
        self._lock = threading.Lock()  # guards the connection, the routing tables, the state
        self._conn: ZmtpConnection | None = None
        self._jobs: dict[str, Job] = {}
        self._calls: dict[str, queue.SimpleQueue[JobEvent]] = {}
        self._link = Link.CONNECTING
        self._state_message = f"not connected to the sdbridge daemon at {self.address} yet"
        self._up = threading.Event()
        self._closed = threading.Event()
        # Ids never repeat within a client, so an event from an old connection matches nothing.
        self._id_prefix = os.urandom(4).hex()  # not `secrets`: it costs ~5 ms of plugin start-up
        self._id_counter = itertools.count(1)
        # The daemon closes the connection on a larger message, failing every live job with it;
        # refusing such a request here fails only that request. `hello` tells the real limit.
        self._max_request_bytes = Limits().max_message_bytes
        self._reader = threading.Thread(target=self._run, name="sdbridge-client", daemon=True)
        self._connect()
        self._reader.start()

    def __repr__(self) -> str:
        return f"<Client {self.address} {'connected' if self.connected else 'disconnected'}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- state ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def link(self) -> Link:
        """What the connection is doing now (`on_state` is called each time it changes)."""
        with self._lock:
            return self._link

    @property
    def state_message(self) -> str:
        """A sentence for the user about the connection (what `on_state` got last)."""
        with self._lock:
            return self._state_message

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        return self._up.wait(timeout)

    # --- requests ------------------------------------------------------------------------------

    def hello(self) -> JobEvent:
        """The daemon's `hello` event: versions, device, model, capabilities, limits."""
        answer = self._call("hello", client=self.client_name)
        limit = answer.get("limits", {}).get("max_message_bytes")
        if isinstance(limit, int) and limit > 0:
            self._max_request_bytes = limit
        return answer

    def results(
        self, before: int | None = None, limit: int | None = None, images: bool = False
    ) -> JobEvent:
        """The daemon's `results` event: its saved results this client may see, newest first;
        `before` a result's number pages back, `images` brings each one's PNG too."""
        fields = {"before": before, "limit": limit, "images": images or None}
        return self._call("results", **{k: v for k, v in fields.items() if v is not None})

    def status(self) -> JobEvent:
        """The daemon's `status` event: device, model, queue."""
        return self._call("status")

    def models(self) -> JobEvent:
        """The daemon's `models` event: every model (family, size, loaded, defaults), LoRAs."""
        return self._call("models")

    def generate(self, **fields: Any) -> Job:
        """Submit a `generate` request (fields as in protocol.md) and return its `Job`.

        ``init_image`` and ``mask_image`` may be `protocol.Image` objects or image maps.
        Invalid fields come back as the job's `error` event. Raises `Disconnected`.
        """
        reserved = _RESERVED_FIELDS.intersection(fields)
        if reserved:
            raise TypeError(f"generate() sets {sorted(reserved)} itself")
        for name in ("init_image", "mask_image"):
            if isinstance(fields.get(name), Image):
                fields[name] = fields[name].to_dict()
        job_id = self._new_id()
        request = {"v": PROTOCOL_VERSION, "op": "generate", "id": job_id, **fields}
        job = Job(self, job_id, request)
        self._send(request, job)
        return job

    def close(self) -> None:
        """Disconnect for good; live jobs end with `connection_lost`."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.close()  # wakes the reader, which fails the live jobs and exits
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def _call(self, op: str, **fields: Any) -> JobEvent:
        """Send a request answered by one event and wait for that event."""
        self._refuse_on_reader_thread(op)
        request_id = self._new_id()
        answers: queue.SimpleQueue[JobEvent] = queue.SimpleQueue()
        self._send({"v": PROTOCOL_VERSION, "op": op, "id": request_id, **fields}, answers)
        try:
            answer = answers.get(timeout=self.timeout)
        except queue.Empty:
            raise ClientTimeout(
                ErrorCode.TIMEOUT,
                f"the sdbridge daemon at {self.address} did not answer {op} "
                f"within {self.timeout:g} s",
            ) from None
        finally:
            with self._lock:
                self._calls.pop(request_id, None)
        if answer.get("event") != "error":
            return answer
        failure = JobFailed(answer)
        if failure.code == ErrorCode.CONNECTION_LOST:
            raise Disconnected(failure.code, failure.message)
        raise ClientError(failure.code, failure.message, failure.field)

    def _cancel(self, job_id: str) -> None:
        # An `unknown_job` answer (the job finished meanwhile) matches no route and is dropped.
        request = {"v": PROTOCOL_VERSION, "op": "cancel", "id": self._new_id(), "job": job_id}
        with contextlib.suppress(Disconnected):  # the job then gets `connection_lost` anyway
            self._send(request, None)

    def _send(self, request: JobEvent, route: Job | queue.SimpleQueue[JobEvent] | None) -> None:
        """Register where the answers go, then send; registering first means no event races."""
        data = pack(request)
        if len(data) > self._max_request_bytes:
            raise ClientError(
                ErrorCode.BAD_MESSAGE,
                f"the request is {len(data)} bytes, over the daemon's limit of "
                f"{self._max_request_bytes} (limits.max_message_bytes); send smaller images",
            )
        request_id = request["id"]
        with self._lock:
            conn = self._conn
            if conn is None:
                unauthorized = self._link.needs_token_change
                code = ErrorCode.UNAUTHORIZED if unauthorized else ErrorCode.CONNECTION_LOST
                raise Disconnected(code, self._state_message)
            if isinstance(route, Job):
                self._jobs[request_id] = route
            elif route is not None:
                self._calls[request_id] = route
        try:
            conn.send([data])
        except ZmtpError as exc:  # the reader sees the same failure and reconnects
            with self._lock:
                self._jobs.pop(request_id, None)
                self._calls.pop(request_id, None)
            raise Disconnected(
                ErrorCode.CONNECTION_LOST,
                f"lost the sdbridge daemon at {self.address} while sending: {exc}",
            ) from exc

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._id_counter)}"

    def _refuse_on_reader_thread(self, what: str) -> None:
        if threading.current_thread() is self._reader:
            raise RuntimeError(
                f"cannot {what} inside an sdbridge callback: it runs on the client's reader "
                "thread, which must keep reading; react to events with Job.subscribe instead"
            )

    # --- the reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        delay = RECONNECT_MIN_DELAY
        while not self._closed.is_set():
            with self._lock:
                conn = self._conn
            if conn is None:
                if self._closed.wait(delay):
                    return
                if self._connect():
                    delay = RECONNECT_MIN_DELAY
                elif self.link.needs_token_change:
                    delay = AUTH_RETRY_DELAY
                else:
                    delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            try:
                frames = conn.recv()
            except ZmtpError as exc:
                self._lose(conn, exc)
                continue
            self._route(frames)

    def _connect(self) -> bool:
        try:
            conn = ZmtpConnection.connect(
                self.address, min(self.timeout, CONNECT_TIMEOUT), plain=self._plain
            )
        except ZmtpAuthError as exc:
            self._set_state(self._auth_link(exc), self._auth_message(exc))
            return False
        except ZmtpFullError as exc:
            self._set_state(Link.FULL, f"the sdbridge daemon at {self.address}: {exc}")
            return False
        except ZmtpError as exc:
            self._set_state(
                Link.UNREACHABLE,
                f"no sdbridge daemon at {self.address} ({exc}); is `sdbridge serve` running?",
            )
            return False
        if self.session is not None:
            # First on the connection, before any job: its results are the session's. The
            # answer matches no request here and is dropped.
            hello = {"v": PROTOCOL_VERSION, "op": "hello", "id": self._new_id()}
            with contextlib.suppress(ZmtpError):  # then the reader finds the connection broken
                conn.send([pack({**hello, "client": self.client_name, "session": self.session})])
        with self._lock:
            if self._closed.is_set():
                conn.close()
                return False
            self._conn = conn
        self._set_state(Link.CONNECTED, f"connected to the sdbridge daemon at {self.address}")
        return True

    def _auth_link(self, exc: ZmtpAuthError) -> Link:
        if exc.refused:
            return Link.TOKEN_REFUSED
        return Link.TOKEN_REQUIRED if self._plain is None else Link.TOKEN_UNEXPECTED

    def _auth_message(self, exc: ZmtpAuthError) -> str:
        daemon = f"the sdbridge daemon at {self.address}"
        if exc.refused:
            return f"{daemon} refused the token: check {TOKEN_ENV} against its token file"
        # A peer that hung up before naming its mechanism leaves this a guess.
        unsure = "" if exc.mechanism else " or is not an sdbridge daemon"
        if self._plain is None:
            return (
                f"{daemon} requires a token{unsure}: set {TOKEN_ENV} (or pass the token to "
                "the client)"
            )
        return f"{daemon} takes no token{unsure} (it listens on loopback only): connect without one"

    def _lose(self, conn: ZmtpConnection, exc: ZmtpError) -> None:
        """The connection broke: end every live job and pending call with `connection_lost`."""
        conn.close()
        with self._lock:
            if self._conn is conn:
                self._conn = None
            jobs = list(self._jobs.values())
            calls = list(self._calls.items())
            self._jobs.clear()
            self._calls.clear()
        if self._closed.is_set():
            reason = "the client was closed"
            link, state = Link.CLOSED, f"disconnected from the sdbridge daemon at {self.address}"
        else:
            reason = f"the sdbridge daemon at {self.address} went away (stopped or restarted)"
            link, state = Link.UNREACHABLE, f"{reason}; reconnecting ({exc})"
        self._set_state(link, state)
        for request_id, answers in calls:
            answers.put(error_event(request_id, ProtocolError(ErrorCode.CONNECTION_LOST, reason)))
        for job in jobs:
            lost = ProtocolError(ErrorCode.CONNECTION_LOST, f"{reason}; the job was lost")
            job._deliver(error_event(job.id, lost))

    def _route(self, frames: list[Frame]) -> None:
        if len(frames) != 1:
            _log.warning("ignoring a %d-frame message from the daemon", len(frames))
            return
        try:
            event = unpack(frames[0])
        except ProtocolError as exc:
            _log.warning("ignoring an undecodable message from the daemon: %s", exc)
            return
        request_id = event.get("id")
        job = answers = None
        with self._lock:
            if isinstance(request_id, str):
                job = self._jobs.get(request_id)
                if job is None:
                    answers = self._calls.pop(request_id, None)
                elif event.get("event") in TERMINAL_EVENTS:
                    del self._jobs[request_id]
        if job is not None:
            job._deliver(event)
        elif answers is not None:
            answers.put(event)
        else:
            _log.debug("dropping an event for no live request: %r", event.get("event"))

    def _set_state(self, link: Link, message: str) -> None:
        connected = link is Link.CONNECTED
        with self._lock:
            changed = self._link is not link
            self._link = link
            self._state_message = message
        if connected:
            self._up.set()
        else:
            self._up.clear()
        if changed:
            _log.info("%s", message)
            if self._on_state is not None:
                _call_back(self._on_state, connected, message)
            if self._on_link is not None:
                _call_back(self._on_link, link, message)
