"""The pure-Python client (sdbridge.wire.client) against libzmq ROUTERs: scripted and real.

The scripted ROUTER (pyzmq, with heartbeats on) makes connection failures, restarts and exact
event sequences cheap to produce; the tests at the end run against the real daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import Peer, free_port, wait_until

from sdbridge.wire import protocol
from sdbridge.wire.client import (
    Client,
    ClientError,
    ClientTimeout,
    Disconnected,
    Job,
    JobCancelled,
    JobEvent,
    JobFailed,
)
from sdbridge.wire.protocol import Image

SERVER_DIR = Path(__file__).resolve().parents[1] / "server"
PROGRESS_STEPS = 3


class ScriptedDaemon:
    """A pyzmq ROUTER that answers like the daemon, in a thread, without a model.

    Its events carry the real daemon's fields (docs/protocol.md; checked against the daemon by
    test_the_scripted_daemon_sends_what_the_real_one_sends). generate: accepted, started,
    progress x3, result (echoing `init_image` as the image); the prompt "hang" stops after
    accepted (cancel: the answer, one more progress, then cancelled), "reject" gets a `bad_type`
    error. With `silent` set it reads and answers nothing.
    """

    def __init__(self, port: int | None = None, heartbeat_ms: int = 100) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 4 * heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TTL, 4 * heartbeat_ms)
        if port is None:
            port = self.router.bind_to_random_port("tcp://127.0.0.1")
        else:
            _bind_when_free(self.router, f"tcp://127.0.0.1:{port}")
        self.port = port
        self.address = f"tcp://127.0.0.1:{port}"
        self.silent = False
        self.max_message_bytes = 64 << 20
        self.peers: set[bytes] = set()
        self.live: dict[tuple[bytes, str], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.router.close()
        self.context.term()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            peer, body = self.router.recv_multipart()
            self.peers.add(peer)
            if not self.silent:
                self._answer(peer, protocol.unpack(body))

    def _send(self, peer: bytes, name: str, rid: str | None, **fields: Any) -> None:
        self.router.send_multipart([peer, protocol.pack(protocol.event(name, rid, **fields))])

    def _progress(self, peer: bytes, rid: str, step: int) -> None:
        self._send(peer, "progress", rid, step=step, total=PROGRESS_STEPS, elapsed=0.1, eta=0.2)

    def _answer(self, peer: bytes, request: dict[str, Any]) -> None:
        op, rid = request["op"], request["id"]
        self._progress(peer, "somebody-else", 1)  # routed nowhere
        if op == "hello":
            limits = {**protocol.Limits().to_dict(), "max_message_bytes": self.max_message_bytes}
            self._send(
                peer, "hello", rid, server="scripted", protocol=[1], device="cpu",
                dtype="float32", model="scripted", models=["scripted"], native_size=[64, 64],
                schedulers=["Euler"], loras=[], controlnets=[], preprocessors=["none"],
                capabilities=["txt2img", "cancel"], limits=limits,
            )  # fmt: skip
        elif op == "status":
            queue = [
                {"id": job, "state": "queued", "position": n, "mine": True}
                for n, (_, job) in enumerate(self.live)
            ]
            self._send(
                peer, "status", rid, device="cpu", dtype="float32", model="scripted", queue=queue,
                running=None,
            )  # fmt: skip
        elif op == "cancel":
            if self.live.pop((peer, request["job"]), None):
                self._send(peer, "cancel", rid, job=request["job"], state="running")
                self._progress(peer, request["job"], 1)
                self._send(peer, "cancelled", request["job"], reason="client")
            else:
                message = f"no live job {request['job']!r} on this connection"
                self._send(peer, "error", rid, code="unknown_job", message=message, field="job")
        elif request.get("prompt") == "reject":
            self._send(peer, "error", rid, code="bad_type", message="no", field="prompt")
        else:
            self._send(peer, "accepted", rid, position=0)
            if request.get("prompt") == "hang":
                self.live[(peer, rid)] = True
                return
            self._send(peer, "started", rid)
            for step in range(1, PROGRESS_STEPS + 1):
                self._progress(peer, rid, step)
            image = request.get("init_image") or Image(1, 1, bytes(4)).to_dict()
            parameters = f"{request.get('prompt')}\nSteps: {PROGRESS_STEPS}"
            saved = {"seed": 1, "path": None, "parameters": parameters}
            self._send(
                peer, "result", rid, images=[{**image, **saved}], parameters=parameters,
                elapsed=0.3, warning=None,
            )  # fmt: skip


def _bind_when_free(sock: zmq.Socket, address: str) -> None:
    # libzmq releases a closed socket's port in its I/O thread, a moment after close().
    deadline = time.monotonic() + 5
    while True:
        try:
            sock.bind(address)
            return
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def scripted() -> Iterator[ScriptedDaemon]:
    server = ScriptedDaemon()
    yield server
    server.stop()


class StateLog:
    """Collects `on_state` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []

    def __call__(self, connected: bool, message: str) -> None:
        self.calls.append((connected, message))

    @property
    def states(self) -> list[bool]:
        return [connected for connected, _ in self.calls]


@pytest.fixture
def client_factory() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(address: str, **options: Any) -> Client:
        client = Client(address, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _names(events: list[JobEvent]) -> list[str]:
    return [event["event"] for event in events]


# --- against the scripted ROUTER -----------------------------------------------------------------


def test_hello_and_status_are_answered_by_id(scripted: ScriptedDaemon, client_factory) -> None:
    client = client_factory(scripted.address)
    assert client.connected
    assert client.hello()["event"] == "hello"
    assert client.status()["event"] == "status"


def test_a_job_streams_its_events_in_order(scripted: ScriptedDaemon, client_factory) -> None:
    client = client_factory(scripted.address)
    job = client.generate(prompt="a cat", seed=1)
    events = list(job.events(timeout=5))
    assert _names(events) == ["accepted", "started"] + ["progress"] * PROGRESS_STEPS + ["result"]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert {e["id"] for e in events} == {job.id}
    assert job.done
    assert job.result(timeout=0) is events[-1]
    assert list(job.events()) == events  # iterating again replays from the first event


def test_late_subscriber_gets_the_past_then_the_live_events(
    scripted: ScriptedDaemon, client_factory
) -> None:
    client = client_factory(scripted.address)
    job = client.generate(prompt="hang")
    assert next(job.events(timeout=5))["event"] == "accepted"
    seen: list[tuple[str, str]] = []
    job.subscribe(lambda event: seen.append((event["event"], threading.current_thread().name)))
    assert seen == [("accepted", threading.current_thread().name)]  # replayed on this thread
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    assert seen[1:] == [("progress", "sdbridge-client"), ("cancelled", "sdbridge-client")]
    job.cancel()  # done: nothing is sent, nothing fails


def test_images_over_8_mib_travel_both_ways(scripted: ScriptedDaemon, client_factory) -> None:
    client = client_factory(scripted.address)
    side = 1600  # 1600 x 1600 x 4 bytes = 9.8 MiB
    image = Image(side, side, bytes(range(256)) * (side * side * 4 // 256))
    result = client.generate(prompt="big", init_image=image).result(timeout=10)
    sent, received = image.to_dict(), result["images"][0]
    assert {key: received[key] for key in sent} == sent


def test_a_refused_request_raises_job_failed_with_code_and_field(
    scripted: ScriptedDaemon, client_factory
) -> None:
    job = client_factory(scripted.address).generate(prompt="reject")
    with pytest.raises(JobFailed) as failure:
        job.result(timeout=5)
    assert (failure.value.code, failure.value.field, failure.value.message) == (
        "bad_type",
        "prompt",
        "no",
    )
    assert _names(list(job.events())) == ["error"]


def test_a_request_over_the_daemons_limit_fails_alone(
    scripted: ScriptedDaemon, client_factory
) -> None:
    states = StateLog()
    client = client_factory(scripted.address, on_state=states)
    live = client.generate(prompt="hang")
    scripted.max_message_bytes = 1000
    client.hello()
    with pytest.raises(ClientError, match="over the daemon's limit of 1000") as refusal:
        client.generate(prompt="x" * 1000)
    assert refusal.value.code == "bad_message"
    assert not live.done and states.states == [True]  # the connection and its jobs live on
    assert client.generate(prompt="small").result(timeout=5)["event"] == "result"


def test_timeouts_raise_a_timeout_error_and_leave_the_job_live(
    scripted: ScriptedDaemon, client_factory
) -> None:
    client = client_factory(scripted.address, timeout=0.3)
    job = client.generate(prompt="hang")
    for wait in (job.result, job.wait, lambda timeout: list(job.events(timeout))):
        started = time.monotonic()
        with pytest.raises(ClientTimeout, match="within 0.2 s") as timeout:  # not the client's 0.3
            wait(timeout=0.2)
        assert time.monotonic() - started >= 0.2  # it waited as long as asked
        assert isinstance(timeout.value, TimeoutError)
        assert timeout.value.code == "timeout"
    assert not job.done
    scripted.silent = True
    with pytest.raises(ClientTimeout, match="did not answer hello within 0.3 s"):
        client.hello()


def test_an_idle_client_keeps_answering_heartbeats(
    scripted: ScriptedDaemon, client_factory
) -> None:
    states = StateLog()
    client = client_factory(scripted.address, on_state=states)
    client.hello()
    time.sleep(1.5)  # a dozen heartbeat intervals, several heartbeat timeouts
    client.hello()
    assert states.states == [True]
    assert len(scripted.peers) == 1  # the same connection throughout


def test_a_daemon_restart_loses_live_jobs_then_the_client_reconnects(
    scripted: ScriptedDaemon, client_factory
) -> None:
    states = StateLog()
    client = client_factory(scripted.address, on_state=states)
    job = client.generate(prompt="hang")
    seen: list[JobEvent] = []
    job.subscribe(seen.append)
    next(job.events(timeout=5))
    scripted.stop()
    with pytest.raises(JobFailed) as failure:
        job.result(timeout=5)
    assert failure.value.code == "connection_lost"
    assert failure.value.message == (
        f"the sdbridge daemon at {scripted.address} went away (stopped or restarted); "
        "the job was lost"
    )
    assert _names(seen) == ["accepted", "error"]
    wait_until(lambda: states.states == [True, False])
    assert not client.connected
    with pytest.raises(Disconnected):
        client.generate(prompt="while it is away")

    restarted = ScriptedDaemon(port=scripted.port)
    try:
        assert client.wait_connected(timeout=5)
        assert client.generate(prompt="again").result(timeout=5)["event"] == "result"
        assert states.states == [True, False, True]
    finally:
        restarted.stop()


def test_no_daemon_yet_then_it_starts(client_factory) -> None:
    port = free_port()
    states = StateLog()
    started = time.monotonic()
    client = client_factory(f"tcp://127.0.0.1:{port}", on_state=states, timeout=60)
    # One refused attempt, no waiting: far less than the connect timeout (milliseconds here).
    assert time.monotonic() - started < 30
    assert not client.connected
    with pytest.raises(Disconnected, match="sdbridge serve") as failure:
        client.hello()
    assert failure.value.code == "connection_lost"
    assert isinstance(failure.value, ConnectionError)
    assert states.states == [False]
    server = ScriptedDaemon(port=port)
    try:
        assert client.wait_connected(timeout=5)  # the retry delay is at most 2 s
        assert client.hello()["event"] == "hello"
        assert states.states == [False, True]
    finally:
        server.stop()


def test_a_peer_that_is_not_zmtp_gives_a_clear_error_not_a_hang(client_factory) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def speak_http() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                peer, _ = server.accept()
            except TimeoutError:
                continue
            with peer, contextlib.suppress(OSError):
                peer.settimeout(5)
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 2)
                # Read until the client hangs up: closing on its unread greeting would reset
                # the connection, and a reset can destroy the reply before the client reads it.
                while peer.recv(4096):
                    pass

    thread = threading.Thread(target=speak_http, daemon=True)
    thread.start()
    try:
        # A hang would end in the handshake timeout's message, not this one.
        client = client_factory(f"tcp://127.0.0.1:{server.getsockname()[1]}", timeout=60)
        assert not client.connected
        assert "does not speak ZMTP" in client.state_message
        with pytest.raises(Disconnected, match="does not speak ZMTP"):
            client.hello()
    finally:
        stop.set()
        thread.join()
        server.close()


def test_close_ends_live_jobs_and_the_reader(scripted: ScriptedDaemon) -> None:
    states = StateLog()
    with Client(scripted.address, on_state=states) as client:
        job = client.generate(prompt="hang")
        next(job.events(timeout=5))
    with pytest.raises(JobFailed, match="the client was closed") as failure:
        job.result(timeout=5)
    assert failure.value.code == "connection_lost"
    assert not client._reader.is_alive()
    assert states.states == [True, False]
    with pytest.raises(Disconnected):
        client.generate(prompt="after close")
    client.close()  # twice is fine


def test_callbacks_cannot_break_or_block_the_reader(
    scripted: ScriptedDaemon, client_factory, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_factory(scripted.address)
    job = client.generate(prompt="hang")
    next(job.events(timeout=5))
    outcomes: list[str] = []

    def misbehave(event: JobEvent) -> None:
        if event["event"] != "accepted":  # accepted is replayed on this thread
            try:
                job.result(timeout=5)
            except RuntimeError as exc:  # on the reader thread: waiting for it cannot work
                outcomes.append(f"{event['event']}: {exc}")
            except JobCancelled:
                outcomes.append(f"{event['event']}: cancelled")
        raise ValueError("plugin bug")

    job.subscribe(misbehave)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    # result() returns as soon as `cancelled` is stored; the reader calls back right after.
    wait_until(lambda: len([r for r in caplog.records if r.exc_info]) == 3)
    assert outcomes[0].startswith("progress: cannot wait for a job inside an sdbridge callback")
    assert outcomes[1] == "cancelled: cancelled"  # done: result() does not wait
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == ["plugin bug"] * 3
    assert client.hello()["event"] == "hello"  # the reader survived it all


def test_a_replay_callback_may_wait_without_stalling_the_reader(
    scripted: ScriptedDaemon, client_factory
) -> None:
    client = client_factory(scripted.address)
    job = client.generate(prompt="hang")
    next(job.events(timeout=5))
    seen: list[str] = []

    def wait_on_accepted(event: JobEvent) -> None:
        if event["event"] == "accepted":
            with pytest.raises(JobCancelled):
                job.result(timeout=5)  # the reader keeps delivering meanwhile
        seen.append(event["event"])

    threading.Timer(0.2, job.cancel).start()
    job.subscribe(wait_on_accepted)
    assert seen == ["accepted", "progress", "cancelled"]


def test_many_threads_each_get_exactly_their_own_jobs_events(
    scripted: ScriptedDaemon, client_factory
) -> None:
    client = client_factory(scripted.address)
    outcomes: list[tuple[str, list[JobEvent]]] = []

    def submit() -> None:
        for _ in range(5):
            job = client.generate(prompt="x")
            outcomes.append((job.id, list(job.events(timeout=10))))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job_id for job_id, _ in outcomes}) == 40
    for job_id, events in outcomes:
        assert {event["id"] for event in events} == {job_id}
        assert _names(events)[-1] == "result"


def test_address_comes_from_the_argument_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch, client_factory
) -> None:
    port = free_port()
    monkeypatch.setenv("SDBRIDGE_ADDRESS", f"tcp://127.0.0.1:{port}")
    assert client_factory(None).address == f"tcp://127.0.0.1:{port}"
    assert client_factory("tcp://[::1]:1").address == "tcp://[::1]:1"
    monkeypatch.delenv("SDBRIDGE_ADDRESS")
    assert client_factory(None).address == protocol.DEFAULT_ADDRESS
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Client("localhost:7878")


def test_generate_chooses_the_id_itself(scripted: ScriptedDaemon, client_factory) -> None:
    with pytest.raises(TypeError, match="'id'"):
        client_factory(scripted.address).generate(prompt="x", id="mine")


# --- no compiled packages: what the editors' Python has ------------------------------------------

BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED or name in BLOCKED:
            raise ImportError(f"{name} is blocked for this test")
        return None
sys.meta_path.insert(0, Blocker())
"""
BLOCKED_PACKAGES = {"torch", "numpy", "PIL", "zmq", "diffusers", "transformers"}


def run_blocked(code: str, blocked: set[str]) -> str:
    """Run ``code`` in a fresh Python where the ``blocked`` modules cannot be imported."""
    script = f"BLOCKED = {sorted(blocked)!r}\n{BLOCKER}\n{code}"
    env = {k: v for k, v in os.environ.items() if k != "MSGPACK_PUREPYTHON"}  # blocked instead
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYTHONPATH": str(SERVER_DIR)},
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.parametrize("compiled_msgpack", [True, False])
def test_plugin_modules_import_without_compiled_packages(compiled_msgpack: bool) -> None:
    modules = ["sdbridge.wire.protocol", "sdbridge.wire.zmtp", "sdbridge.wire.client"]
    if (SERVER_DIR / "sdbridge" / "canvas.py").exists():
        modules.append("sdbridge.editor.canvas")
    blocked = BLOCKED_PACKAGES | (set() if compiled_msgpack else {"msgpack._cmsgpack"})
    code = f"""
import importlib, json, msgpack
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps({{"packer": msgpack.Packer.__module__,
                  "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)}}))
"""
    report = json.loads(run_blocked(code, blocked))
    assert report["loaded"] == []
    assert report["packer"] == ("msgpack._cmsgpack" if compiled_msgpack else "msgpack.fallback")


def test_the_client_works_on_pure_python_msgpack(scripted: ScriptedDaemon) -> None:
    code = f"""
import msgpack
from sdbridge.wire.client import Client, JobCancelled
from sdbridge.wire.protocol import Image
assert msgpack.Packer.__module__ == "msgpack.fallback"
with Client({scripted.address!r}, timeout=10) as client:
    assert client.hello()["model"] == "scripted"
    image = Image(1600, 1600, bytes(range(256)) * 40000)
    result = client.generate(prompt="big", init_image=image).result(timeout=30)
    assert result["images"][0]["data"] == image.data
    job = client.generate(prompt="hang")
    job.cancel()
    try:
        job.result(timeout=10)
    except JobCancelled:
        print("ok")
"""
    assert run_blocked(code, BLOCKED_PACKAGES | {"msgpack._cmsgpack"}).strip() == "ok"


# --- against the real daemon ---------------------------------------------------------------------

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 6, "seed": 3}


def test_daemon_job_events_arrive_in_order(daemon, client_factory) -> None:
    client = client_factory(daemon.address)
    assert client.hello()["event"] == "hello"
    job = client.generate(**JOB, preview_every=2)
    events = list(job.events(timeout=60))
    names = _names(events)
    assert names[:2] == ["accepted", "started"]
    assert names[-1] == "result"
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == list(range(1, 7))
    assert [e["step"] for e in events if e["event"] == "preview"] == [2, 4, 6]
    result = job.result(timeout=0)
    assert Path(result["images"][0]["path"]).is_file()


def test_daemon_results_and_init_images_over_8_mib(daemon, client_factory) -> None:
    client = client_factory(daemon.address)
    side = 1600  # raw RGBA: 9.8 MiB each way
    init = Image(side, side, bytes([200, 30, 30, 255]) * (side * side))
    result = client.generate(**JOB, init_image=init, strength=0.5, width=side, height=side)
    image = result.result(timeout=120)["images"][0]
    assert (image["width"], image["height"], len(image["data"])) == (side, side, side * side * 4)


def test_daemon_cancel_yields_cancelled_then_the_next_job_runs(daemon, client_factory) -> None:
    client = client_factory(daemon.address)
    job = client.generate(**{**JOB, "num_inference_steps": 150})
    for event in job.events(timeout=60):
        if event["event"] == "progress":
            job.cancel()
    with pytest.raises(JobCancelled):
        job.result(timeout=0)
    assert client.generate(**JOB).result(timeout=60)["event"] == "result"


def test_daemon_refusal_is_a_job_failed_naming_the_field(daemon, client_factory) -> None:
    job = client_factory(daemon.address).generate(prompt="x", num_inference_steps=0)
    with pytest.raises(JobFailed) as failure:
        job.result(timeout=30)
    assert (failure.value.code, failure.value.field) == ("out_of_range", "num_inference_steps")
    with pytest.raises(ClientError) as refusal:  # a non-job request's error, matched by id
        client_factory(daemon.address)._call("status", surprise=1)
    assert (refusal.value.code, refusal.value.field) == ("unknown_field", "surprise")


def test_daemon_two_clients_each_get_exactly_their_own_events(daemon, client_factory) -> None:
    alice, bob = client_factory(daemon.address), client_factory(daemon.address)
    seen: dict[str, list[JobEvent]] = {"alice": [], "bob": []}
    jobs: dict[str, Job] = {}
    for name, client, seed in (("alice", alice, 1), ("bob", bob, 2)):
        jobs[name] = client.generate(**{**JOB, "seed": seed})
        jobs[name].subscribe(seen[name].append)
    for name in jobs:
        assert jobs[name].result(timeout=60)["images"][0]["seed"] == {"alice": 1, "bob": 2}[name]
        assert {e["id"] for e in seen[name]} == {jobs[name].id}
        assert _names(seen[name])[-1] == "result"


@pytest.mark.slow  # two daemon start-ups
def test_daemon_restart_mid_session(daemon_factory, client_factory) -> None:
    own = daemon_factory("--heartbeat-ms", "100")
    states = StateLog()
    client = client_factory(own.address, on_state=states)
    client.hello()
    time.sleep(1.0)  # idle through ten heartbeats
    job = client.generate(**{**JOB, "num_inference_steps": 150})
    next(e for e in job.events(timeout=60) if e["event"] == "progress")
    own.kill()
    with pytest.raises(JobFailed, match="went away") as failure:
        job.result(timeout=10)
    assert failure.value.code == "connection_lost"
    own.start()
    assert client.wait_connected(timeout=10)
    assert client.generate(**JOB).result(timeout=60)["event"] == "result"
    assert states.states == [True, False, True]


def _fields_by_event(address: str) -> dict[str, set[str]]:
    """The field names of every kind of event a daemon sends for hello, status, a job, a refused
    job, a cancelled job and an unknown cancel; an image's own fields under `result.images`."""
    peer = Peer(address)
    try:
        events = [peer.answer("hello"), peer.answer("status")]
        events += peer.generate(prompt="a cat", num_inference_steps=PROGRESS_STEPS, seed=1)
        events += peer.generate(prompt="reject", num_inference_steps=0)  # refused by both
        hang = peer.send("generate", prompt="hang", num_inference_steps=150, width=8, height=8)
        events += peer.until(hang, {"accepted"})
        events.append(peer.answer("cancel", job=hang))
        events += peer.until(hang)
        events.append(peer.answer("cancel", job="gone"))
    finally:
        peer.close()
    fields: dict[str, set[str]] = {}
    for event in events:
        fields.setdefault(event["event"], set()).update(event)
        if event["event"] == "result":
            fields.setdefault("result.images", set()).update(*event["images"])
    return fields


def test_the_scripted_daemon_sends_what_the_real_one_sends(
    scripted: ScriptedDaemon, daemon
) -> None:
    """The tests above hold for the daemon only if the fake's events are the daemon's."""
    real = _fields_by_event(daemon.address)
    assert {"hello", "status", "accepted", "started", "progress", "result", "error"} <= set(real)
    assert _fields_by_event(scripted.address) == real
