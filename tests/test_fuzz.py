"""Property-based fuzzing: the protocol decoder, and a live daemon fed garbage at two layers.

The decoder (msgpack + validation) may only ever raise `ProtocolError`. A live daemon fed random
and mutated messages over libzmq, and broken ZMTP over raw TCP, must stay up, never answer
`internal` (that would be a bug in its handling), and still give each well-formed job from a
well-behaved client exactly one terminal event. And no job within the limits, whatever its
numbers, costs more steps or memory than stated at `PEAK_GROWTH`. The counts of inputs tried are
printed at the end of the run (docs/reliability.md quotes them).
"""

from __future__ import annotations

import collections
import contextlib
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import DaemonProcess, Peer, solid_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdbridge.daemon.schedulers import NAMES
from sdbridge.wire import protocol
from sdbridge.wire.client import Client
from sdbridge.wire.protocol import ProtocolError

TRIED: collections.Counter[str] = collections.Counter()
LIMITS = protocol.Limits()
FUZZ_LIMITS = ["--max-steps", "2", "--max-side", "64", "--max-images", "2"]
FUZZ_LIMITS += ["--max-message-bytes", str(1 << 20), "--max-queue-per-client", "64"]
GOOD_JOB = {"prompt": "a red circle", "num_inference_steps": 2, "width": 32, "height": 32}
LIVE = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if TRIED and capture is not None:
        with capture.global_and_fixture_disabled():
            print("\nfuzz inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))


# --- values and messages -------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
image = st.fixed_dictionaries(
    {"width": st.integers(1, 4), "height": st.integers(1, 4), "format": st.just("raw")}
).map(lambda d: {**d, "data": bytes(d["width"] * d["height"] * 4)})
good_generate = st.fixed_dictionaries(
    {"v": st.just(1), "op": st.just("generate"), "id": st.text(min_size=1, max_size=8)},
    optional={
        "prompt": st.text(max_size=30),
        "negative_prompt": st.text(max_size=10),
        "num_inference_steps": st.integers(1, 2),
        "guidance_scale": st.floats(0, 30),
        "seed": st.integers(0, 2**32 - 1),
        "width": st.integers(8, 64),
        "height": st.integers(8, 64),
        "num_images": st.integers(1, 2),
        "init_image": image,
        "mask_image": image,
        "strength": st.floats(0.1, 1.0),
        "preview_every": st.integers(0, 2),
        "output_format": st.sampled_from(["raw", "png"]),
        "model": st.text(max_size=10),
    },
)
good_other = st.sampled_from(["hello", "status", "cancel"]).flatmap(
    lambda op: st.fixed_dictionaries(
        {"v": st.just(1), "op": st.just(op), "id": st.text(min_size=1, max_size=8)},
        optional={"job": st.text(max_size=8)} if op == "cancel" else {},
    )
)
FIELDS = sorted(protocol.COMMON_FIELDS | set().union(*protocol.OP_FIELDS.values()))


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A plausible request with a few fields replaced, removed or added, or wrapped in junk."""
    message = dict(draw(good_generate | good_other))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "delete", "add", "wrap"]))
        if action == "replace":
            message[draw(st.sampled_from(FIELDS))] = draw(values)
        elif action == "delete" and message:
            del message[draw(st.sampled_from(list(message)))]
        elif action == "add":
            message[draw(st.text(max_size=8) | st.binary(max_size=8))] = draw(values)
        elif action == "wrap":
            return draw(st.sampled_from([[message], {"message": message}, (message, message)]))
    return message


@st.composite
def message_bytes(draw: st.DrawFn) -> bytes:
    """One message body: mutated or random values, packed, then possibly damaged."""
    obj = draw(mutated() | values)
    # Without the bin type, bytes go out as msgpack str: invalid UTF-8 for the decoder.
    data = msgpack.packb(obj, use_bin_type=draw(st.booleans()))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "append", "random"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        index = draw(st.integers(0, len(data) - 1))
        data = data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1 :]
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    elif damage == "random":
        data = draw(st.binary(max_size=64))
    return data


def decode(data: bytes) -> None:
    """What the daemon does with one frame before anything reaches the queue."""
    message = protocol.unpack(data)
    op, _ = protocol.validate_envelope(message)
    if op == "generate":
        protocol.validate_generate(message, LIMITS)
    elif op == "cancel":
        protocol.validate_cancel(message)


# --- the decoder -------------------------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(message_bytes())
def test_the_decoder_raises_only_protocol_errors(data: bytes) -> None:
    TRIED["decoder"] += 1
    with contextlib.suppress(ProtocolError):
        decode(data)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (msgpack.packb({"v": 1, "id": "x", "op": [1]}), "unknown_op"),
        (msgpack.packb({"v": 1, "id": "x", "op": {"a": 1}}), "unknown_op"),
        (
            msgpack.packb(
                {"v": 1, "id": "x", "op": "generate", "prompt": "", "init_image": {b"a": 1, "b": 2}}
            ),
            "unknown_field",
        ),
        (msgpack.packb({"v": 1, "id": "x", "op": "generate", "prompt": None}), "bad_type"),
        (msgpack.packb({"v": 1, "id": "x", "op": "cancel", "job": None}), "bad_type"),
        (b"\x91" * 100_000, "bad_message"),  # nested deeper than any stack
        (b"\x81\xa2\xff\xfe\x01", "bad_message"),  # a map key that is not UTF-8
        (b"\xdd\xff\xff\xff\xff", "bad_message"),  # an array claiming 4 billion items
    ],
)
def test_inputs_the_fuzzer_found_or_that_must_stay_covered(data: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode(data)
    assert refused.value.code == code


# --- a live daemon -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    process = DaemonProcess(pipeline_dir, tmp_path_factory.mktemp("fuzz"), *FUZZ_LIMITS).start()
    yield process
    process.stop()


class GoodClient(Peer):
    """A well-behaved client submitting jobs between the fuzzer's inputs."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.sent: list[str] = []

    def submit(self) -> None:
        self.sent.append(self.send("generate", id=f"good-{len(self.sent)}", **GOOD_JOB))

    def collect(self, timeout: float = 120.0) -> dict[str, list[str]]:
        """Every event per job id, once each job has its terminal event."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain(200)
            terminal = {e["id"] for e in self.inbox if e["event"] in protocol.TERMINAL_EVENTS}
            if terminal >= set(self.sent):
                break
        self.drain(500)  # anything late would be a second terminal event
        kinds: dict[str, list[str]] = collections.defaultdict(list)
        for event in self.inbox:
            kinds[event["id"]].append(event["event"])
        return kinds


def assert_serving(target: DaemonProcess, good: GoodClient) -> None:
    assert target.process is not None and target.process.poll() is None, target.log()
    kinds = good.collect()
    assert set(kinds) == set(good.sent)
    for rid, events in kinds.items():
        terminal = [e for e in events if e in protocol.TERMINAL_EVENTS]
        assert terminal == ["result"], (rid, events)
        assert events[0] == "accepted", (rid, events)


@pytest.fixture
def good(target: DaemonProcess) -> Iterator[GoodClient]:
    client = GoodClient(target.address)
    yield client
    client.close()


def test_a_daemon_fed_random_messages_keeps_serving(target: DaemonProcess, good) -> None:
    fuzzer = Peer(target.address)
    answers: list[dict[str, Any]] = []

    @LIVE
    @given(st.lists(message_bytes(), min_size=1, max_size=3))
    def feed(frames: list[bytes]) -> None:
        TRIED["live messages"] += 1
        fuzzer.send_raw(*frames)
        if TRIED["live messages"] % 25 == 0:
            good.submit()
        answers.extend(fuzzer.drain())

    try:
        feed()
        answers.extend(fuzzer.drain(2000))
    finally:
        fuzzer.close()
    assert answers  # the daemon answered the fuzzer, it did not just drop everything
    internal = [e for e in answers if e.get("code") == "internal"]
    assert not internal, internal[:3]
    assert_serving(target, good)


def _greeting(mechanism: bytes = b"NULL") -> bytes:
    return b"\xff" + bytes(8) + b"\x7f\x03\x01" + mechanism.ljust(20, b"\0") + bytes(32)


def _frame(flags: int, body: bytes) -> bytes:
    if len(body) > 255:
        return struct.pack(">BQ", flags | 0x02, len(body)) + body
    return struct.pack(">BB", flags, len(body)) + body


READY = _frame(0x04, b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER")
HELLO = protocol.pack({"v": 1, "op": "hello", "id": "raw"})


@st.composite
def zmtp_streams(draw: st.DrawFn) -> bytes:
    """A byte stream that is ZMTP up to some point and then goes wrong."""
    broken = draw(
        st.sampled_from(
            ["greeting", "mechanism", "ready", "flags", "oversize", "truncated", "command"]
        )
    )
    junk = draw(st.binary(max_size=80))
    if broken == "greeting":
        return draw(st.binary(max_size=64)) + junk
    if broken == "mechanism":
        return _greeting(draw(st.sampled_from([b"CURVE", b"PLAIN", b"GSSAPI", b"\xff\x00X"])))
    stream = _greeting()
    if broken == "ready":  # a handshake command that is not READY, or a READY that lies
        return stream + draw(st.sampled_from([_frame(0x04, junk), _frame(0x00, junk), READY[:5]]))
    stream += READY
    if broken == "flags":
        return stream + bytes([draw(st.integers(0x08, 0xFF))]) + junk
    if broken == "oversize":  # bigger than MAXMSGSIZE, or than anything addressable
        size = draw(st.sampled_from([(1 << 20) + 1, 1 << 40, 2**64 - 1]))
        return stream + struct.pack(">BQ", 0x02, size) + junk
    if broken == "truncated":
        frame = _frame(draw(st.sampled_from([0x00, 0x01])), HELLO + junk)
        return stream + frame[: draw(st.integers(1, len(frame) - 1))]
    return stream + _frame(0x04, bytes([draw(st.integers(0, 255))]) + junk)  # broken command


def test_a_daemon_fed_broken_zmtp_keeps_serving(target: DaemonProcess, good) -> None:
    @LIVE
    @given(zmtp_streams(), st.booleans())
    def feed(stream: bytes, linger: bool) -> None:
        TRIED["raw ZMTP streams"] += 1
        # The daemon may hang up on us half-way: an OSError then is its right.
        with (
            socket.create_connection(("127.0.0.1", target.port), timeout=5) as raw,
            contextlib.suppress(OSError),
        ):
            raw.sendall(stream)
            if linger:  # read what it says back, if anything, before hanging up
                raw.settimeout(0.02)
                raw.recv(4096)
        if TRIED["raw ZMTP streams"] % 25 == 0:
            good.submit()

    feed()
    assert_serving(target, good)


TOKEN = "fuzz-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    workdir = tmp_path_factory.mktemp("fuzz-plain")
    process = DaemonProcess(pipeline_dir, workdir, *FUZZ_LIMITS, token=TOKEN).start()
    yield process
    process.stop()


@st.composite
def plain_logins(draw: st.DrawFn) -> bytes:
    """A PLAIN greeting and a HELLO with wrong, near-miss or malformed credentials, or another
    command where HELLO belongs."""
    token = TOKEN.encode()
    username = draw(st.binary(max_size=40))
    password = draw(
        st.binary(max_size=300) | st.sampled_from([b"", token[:-1], token + b"x", token.upper()])
    )
    # Lengths are one byte: a password over 255 bytes lies about its own length.
    hello = bytes([len(username)]) + username + bytes([len(password) % 256]) + password
    body = draw(
        st.sampled_from([b"\x05HELLO", b"\x08INITIATE", b"\x05READY", b"\x07WELCOME"])
    ) + draw(st.sampled_from([hello, hello[: len(hello) // 2], hello + b"junk"]))
    return _greeting(b"PLAIN") + _frame(0x04, body) + draw(st.sampled_from([b"", READY]))


def test_a_daemon_with_a_token_lets_no_wrong_login_in(guarded: DaemonProcess) -> None:
    @LIVE
    @given(plain_logins())
    def feed(stream: bytes) -> None:
        TRIED["PLAIN logins"] += 1
        received = b""
        with (
            socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as raw,
            contextlib.suppress(OSError),
        ):
            raw.sendall(stream)
            raw.settimeout(0.05)
            while chunk := raw.recv(4096):
                received += chunk
        assert b"WELCOME" not in received and b"READY" not in received

    feed()
    assert guarded.process is not None and guarded.process.poll() is None, guarded.log()
    # So many wrong tokens lock this address out for a minute, the right token too; another
    # address (127.0.0.2 reaches the same loopback daemon) is served.
    with Client(guarded.address, timeout=5, token=TOKEN) as locked_out:
        assert not locked_out.wait_connected(2)
        assert "refused the token" in locked_out.state_message
    elsewhere = Peer(guarded.address.replace("tcp://", "tcp://127.0.0.2:0;"), token=TOKEN)
    try:
        assert elsewhere.generate(**GOOD_JOB)[-1]["event"] == "result"
    finally:
        elsewhere.close()
    assert len(list(guarded.output_dir.glob("*/*.png"))) == 1  # only the job with the token


# --- bounded work per request --------------------------------------------------------------------

# No request within the limits may cost more than its steps. A pass runs at most its
# num_inference_steps: a low strength lengthens the schedule only up to the scheduler's
# num_train_timesteps, never to 1 / strength. Second-order samplers (Heun, DPM2) evaluate the
# model twice per step, and a second pass ("refine") repeats the first at most: at most 4 x steps
# progress events in all. And the daemon's peak memory after a job of the largest size asked here
# grows by less than PEAK_GROWTH (a schedule of 1 / strength timesteps at strength 1e-9 takes 8 GB).
PEAK_GROWTH = 1 << 30
COST_SIDE = 512
strengths = st.floats(0, 1, exclude_min=True) | st.sampled_from([1e-9, 5e-324, 1 / 1000])
numeric_jobs = st.fixed_dictionaries(
    {
        "num_inference_steps": st.integers(1, 8),
        "width": st.integers(8, COST_SIDE),
        "height": st.integers(8, COST_SIDE),
        "init": st.booleans(),
        "strength": strengths,
        "refine_strength": st.just(0.0) | strengths,
    },
    optional={
        "guidance_scale": st.floats(0, protocol.MAX_GUIDANCE),
        "num_images": st.integers(1, 2),
        "seed": st.integers(0, protocol.MAX_SEED),
        "scheduler": st.sampled_from(NAMES),
    },
)


def peak_memory(process: DaemonProcess) -> int:
    """The daemon's peak resident memory since it started (VmHWM), in bytes."""
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None
    return int(match[1]) * 1024


def costed_job(fields: dict[str, Any]) -> dict[str, Any]:
    """A generate request of the drawn numbers: an init image of the drawn size, or none."""
    job = {"prompt": "a red circle", **fields}
    if job.pop("init"):
        job["init_image"] = solid_image(job["width"], job["height"], (200, 40, 40, 255))
    else:
        del job["strength"]  # strength below 1 needs an init image
    return job


@pytest.fixture(scope="module")
def costed(pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """A daemon of its own, its peak memory taken after a job of the largest size asked."""
    workdir = tmp_path_factory.mktemp("costed")
    process = DaemonProcess(pipeline_dir, workdir, "--max-steps", "8").start()
    peer = Peer(process.address)
    largest = {"init": True, "strength": 0.5, "refine_strength": 0.5, "num_images": 2}
    events = peer.generate(
        **costed_job(dict(largest, num_inference_steps=8, width=COST_SIDE, height=COST_SIDE))
    )
    assert events[-1]["event"] == "result", events[-1]
    yield process, peer, peak_memory(process)
    peer.close()
    process.stop()


@settings(max_examples=20, deadline=None)
@given(numeric_jobs)
def test_no_request_within_the_limits_costs_more_than_its_steps(costed, fields) -> None:
    process, peer, baseline = costed
    job = costed_job(fields)
    events = peer.generate(**job)
    assert events[-1]["event"] == "result", events[-1]
    progress = [event for event in events if event["event"] == "progress"]
    assert [event["step"] for event in progress] == list(range(1, len(progress) + 1))
    assert progress[-1]["total"] == len(progress) <= 4 * job["num_inference_steps"]
    assert peak_memory(process) - baseline < PEAK_GROWTH
