"""Jobs belong to connections: who gets results, what a departed client leaves, who may connect,
how connections share the queue, and that a folder rescan never stalls the socket."""

from __future__ import annotations

import json
import statistics
import struct
import threading
import time
from pathlib import Path

import psutil
import pytest
import zmq
from helpers import DaemonProcess, Peer, ask, wait_until

from sdbridge.wire import protocol
from sdbridge.wire.client import Client
from sdbridge.wire.zmtp import ZmtpConnection, ZmtpError

JOB = {"prompt": "a red circle on a blue background", "num_inference_steps": 8, "seed": 42}
LONG = {**JOB, "num_inference_steps": 60}


def named_peer(address: str, routing_id: bytes) -> Peer:
    """A peer that chooses its own ZeroMQ routing id, as any libzmq client may."""
    peer = Peer.__new__(Peer)
    peer.socket = zmq.Context.instance().socket(zmq.DEALER)
    peer.socket.setsockopt(zmq.LINGER, 0)
    peer.socket.setsockopt(zmq.ROUTING_ID, routing_id)
    peer.socket.connect(address)
    peer.inbox, peer.counter = [], 0
    return peer


def saved_images(daemon: DaemonProcess, seed: int) -> list[Path]:
    return list(daemon.output_dir.glob(f"*/*-{seed}.png"))


def queue_length(daemon: DaemonProcess) -> int:
    watcher = Peer(daemon.address)
    try:
        return len(watcher.answer("status")["queue"])
    finally:
        watcher.close()


def test_a_new_connection_claiming_a_departed_clients_id_gets_none_of_its_events(
    daemon_factory,
) -> None:
    daemon = daemon_factory()
    # An id of the form libzmq gives (a zero byte, 4 more): as an attacker would forge it.
    victim = named_peer(daemon.address, b"\x00ARTS")
    rid = victim.send("generate", **{**LONG, "seed": 7001, "preview_every": 1})
    victim.until(rid, {"progress"})
    victim.close()
    wait_until(lambda: queue_length(daemon) == 1)  # the daemon has seen it go; the job runs on
    thief = named_peer(daemon.address, b"\x00ARTS")
    try:
        thief.send("hello")  # connected under the victim's id
        wait_until(lambda: saved_images(daemon, 7001), 120)  # the job finished and was saved
        wait_until(lambda: queue_length(daemon) == 0)
        assert [event for event in thief.drain(500) if event["id"] == rid] == []
    finally:
        thief.close()


def test_a_client_chosen_routing_id_is_refused(daemon) -> None:
    chooser = named_peer(daemon.address, b"artist")
    try:
        chooser.send("generate", **JOB)
        refusal = chooser.receive()
        assert (refusal["event"], refusal["code"], refusal["id"]) == ("error", "bad_message", None)
        assert "ROUTING_ID" in refusal["message"]
        assert chooser.silent(0.5)  # no `accepted`: the job was never queued
    finally:
        chooser.close()


def test_a_departed_clients_queued_jobs_are_dropped_and_its_running_job_is_saved(
    daemon_factory,
) -> None:
    daemon = daemon_factory()
    leaver = Peer(daemon.address)
    running = leaver.send("generate", **{**LONG, "seed": 7100})
    queued = [leaver.send("generate", **{**JOB, "seed": 7101 + index}) for index in range(4)]
    leaver.until(queued[-1], {"accepted"})
    leaver.until(running, {"progress"})
    leaver.close()
    wait_until(lambda: queue_length(daemon) <= 1)  # only the running job is left
    stayer = Peer(daemon.address)
    try:
        assert stayer.generate(**JOB)[-1]["event"] == "result"
    finally:
        stayer.close()
    assert len(saved_images(daemon, 7100)) == 1
    assert not any(saved_images(daemon, 7101 + index) for index in range(4))


def test_a_second_artist_waits_for_one_job_of_a_batch_not_for_all_of_it(daemon_factory) -> None:
    daemon = daemon_factory()
    batch, single = Peer(daemon.address), Peer(daemon.address)
    try:
        jobs = [batch.send("generate", **{**JOB, "seed": seed}) for seed in range(6)]
        batch.until(jobs[-1], {"accepted"})
        accepted = single.until(single.send("generate", **JOB), {"accepted"})[-1]
        assert accepted["position"] <= 2  # behind the running job and at most one more
        positions = {
            entry["position"] for entry in single.answer("status")["queue"] if entry["mine"]
        }
        assert positions == {accepted["position"]}
        single.until(accepted["id"])
        batch.drain(0)  # everything the batch got before the single job's result
        finished = [event for event in batch.inbox if event["event"] == "result"]
        assert len(finished) <= 2
        for rid in jobs:
            if not any(e["id"] == rid and e["event"] == "result" for e in batch.inbox):
                batch.until(rid)
    finally:
        batch.close()
        single.close()


def test_the_queue_limit_counts_every_connection_of_one_address(daemon_factory) -> None:
    daemon = daemon_factory("--max-queue-per-client", "2")
    first, second, third = (Peer(daemon.address) for _ in range(3))
    try:
        first.until(first.send("generate", **LONG), {"accepted"})
        second.until(second.send("generate", **JOB), {"accepted"})
        refused = third.until(third.send("generate", **JOB), {"accepted", "error"})[-1]
        assert refused["code"] == "busy"
        assert "max_queue_per_client" in refused["message"]
    finally:
        for peer in (first, second, third):
            peer.close()


def test_connections_beyond_the_limit_are_refused_before_they_can_send(daemon_factory) -> None:
    daemon = daemon_factory("--max-connections", "3")
    held = [ZmtpConnection.connect(daemon.address, timeout=10) for _ in range(3)]
    with pytest.raises(ZmtpError, match="too many connections"):
        ZmtpConnection.connect(daemon.address, timeout=10)
    held.pop().close()
    # The daemon learns of the close from libzmq's monitor: then there is room again.
    deadline = time.monotonic() + 10
    while True:
        try:
            held.append(ZmtpConnection.connect(daemon.address, timeout=10))
            break
        except ZmtpError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    for connection in held:
        connection.close()


def test_the_client_says_the_daemon_is_full_not_that_the_token_is_wrong(daemon_factory) -> None:
    token = "a-token-of-twenty-four-b"
    daemon = daemon_factory("--max-connections", "1", token=token)
    with Client(daemon.address, token=token, timeout=5) as first:
        assert first.wait_connected(10)
        with Client(daemon.address, token=token, timeout=5) as second:
            assert not second.wait_connected(2)
            assert "too many connections" in second.state_message


def test_guessing_the_token_is_cut_off_after_a_few_tries_and_logged_once(daemon_factory) -> None:
    token = "the-right-token-of-24-by"
    daemon = daemon_factory(token=token)
    for attempt in range(30):
        with pytest.raises(ZmtpError):
            ZmtpConnection.connect(
                daemon.address, timeout=10, plain=(b"u", f"guess-{attempt:02d}".encode())
            )
    # Locked out for the window: even the right token is refused from this address now.
    with pytest.raises(ZmtpError):
        ZmtpConnection.connect(daemon.address, timeout=10, plain=(b"u", token.encode()))
    refusals = [line for line in daemon.log().splitlines() if "refused" in line]
    assert 1 <= len(refusals) <= 2, refusals


def listed_model(folder: Path) -> None:
    """A diffusers folder as the scan sees it (its index): listed as a model, never loaded."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def test_a_flood_of_rescans_does_not_stall_other_clients(daemon_factory, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for index in range(301):
        listed_model(models / f"model-{index:03d}")
    daemon = daemon_factory("--models-dir", str(models))
    stop = threading.Event()

    sent = [0] * 8

    def flood(kind: int) -> None:
        """Keeps 20 requests in flight: a new one for each answer."""
        peer = Peer(daemon.address)

        def one() -> None:
            sent[kind] += 1
            if kind % 2:
                peer.send("models")
            else:
                peer.send("generate", prompt="x", model="not-downloaded-yet")

        try:
            for _ in range(20):
                one()
            while not stop.is_set():
                if peer.drain(100):
                    one()
        finally:
            peer.close()

    flooders = [threading.Thread(target=flood, args=(kind,)) for kind in range(8)]
    for thread in flooders:
        thread.start()
    watcher = Peer(daemon.address)
    try:
        round_trips = []
        watch_until = time.monotonic() + 5
        while time.monotonic() < watch_until:
            asked = time.monotonic()
            watcher.answer("status")
            round_trips.append(time.monotonic() - asked)
        listed = {model["name"] for model in watcher.answer("models")["models"]}
    finally:
        stop.set()
        for thread in flooders:
            thread.join()
        watcher.close()
    assert {f"model-{index:03d}" for index in range(301)} <= listed  # answered from real scans
    # The socket thread never scans: a status waits for no scan (before: ~1 s each).
    assert statistics.median(round_trips) < 0.25, round_trips
    print(
        f"\nrescan flood: {sum(sent)} models/unknown-model requests from 8 connections on a "
        f"301-model folder; status round trip median {statistics.median(round_trips) * 1000:.0f}"
        f" ms, slowest {max(round_trips) * 1000:.0f} ms"
    )


def test_a_client_that_floods_without_reading_is_cut_off_and_the_daemon_lives_on(
    daemon_factory,
) -> None:
    # Heartbeats every 200 ms: libzmq 4.3 aborts the process when one fires on a connection
    # whose full receive queue's peer has hung up, unless that queue is never full.
    daemon = daemon_factory("--heartbeat-ms", "200")
    memory = psutil.Process(daemon.process.pid)
    idle = memory.memory_info().rss
    flooder = ZmtpConnection.connect(daemon.address, timeout=10)
    request = protocol.pack({"v": 1, "op": "status", "id": "s"})
    sent = 0
    with pytest.raises(ZmtpError):  # the daemon shuts the connection down under it
        while sent < 2_000_000:
            flooder.send([request])
            sent += 1
    flooder.close()
    time.sleep(1.0)  # several heartbeats
    assert daemon.process.poll() is None
    assert ask(daemon.address, {"v": 1, "op": "hello", "id": "h"})["event"] == "hello"
    assert "over 2000 messages a second" in daemon.log()
    grown = memory.memory_info().rss - idle
    assert grown < 256 * 2**20
    print(f"\nflood without reading: cut off after {sent} messages, daemon RSS +{grown >> 20} MiB")


def test_half_sent_messages_pin_at_most_max_connections_times_max_message_bytes(
    daemon_factory,
) -> None:
    # 1 MP images make 9 MiB messages; 4 connections may hold one half-sent message each.
    daemon = daemon_factory("--max-pixels", str(1 << 20), "--max-connections", "4")
    message_bytes = protocol.message_bytes_for(1 << 20)
    memory = psutil.Process(daemon.process.pid)
    idle = memory.memory_info().rss
    stalled = []
    for _ in range(4):
        connection = ZmtpConnection.connect(daemon.address, timeout=10)
        # A LONG frame announcing the largest message, 90% of it sent, then nothing more.
        header = bytes([0x02]) + struct.pack(">Q", message_bytes)
        connection._sock.sendall(header + bytes(message_bytes * 9 // 10))
        stalled.append(connection)
    with pytest.raises(ZmtpError, match="too many connections"):
        ZmtpConnection.connect(daemon.address, timeout=10)
    time.sleep(1.0)  # let the daemon read what was sent
    pinned = memory.memory_info().rss - idle
    assert pinned <= 4 * message_bytes + 64 * 2**20, pinned >> 20
    for connection in stalled:
        connection.close()
    print(f"\nhalf-sent messages: 4 connections x {message_bytes >> 20} MiB, +{pinned >> 20} MiB")
