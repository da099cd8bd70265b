"""The daemon connection, kept off Krita's GUI thread.

`sdbridge.wire.Client` connects in its constructor and `hello()` waits for an answer, so every
client call runs on one worker thread fed by a queue; the client's own reader thread delivers
events. Both hand their news to the GUI thread as Qt signals, which Qt queues because the
emitting thread is not the one this object lives in.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable
from typing import Any

from PyQt5.QtCore import QObject, pyqtSignal

from sdbridge import __version__
from sdbridge.wire.client import Client, ClientError, Job
from sdbridge.wire.protocol import TERMINAL_EVENTS, ErrorCode, ProtocolError, error_event

CLIENT_NAME = f"sdbridge-krita/{__version__}"
# How sdbridge.wire.client words a connection that the daemon's token check refused.
AUTH_REFUSED = re.compile(r"refused the token|requires a token|takes no token")
_log = logging.getLogger(__name__)


class Connection(QObject):
    # (connected, a sentence for the artist, the technical detail)
    state_changed = pyqtSignal(bool, str, str)
    # the daemon's hello event
    hello_received = pyqtSignal(object)
    # (the plugin's job key, one event of that job as on the wire)
    job_event = pyqtSignal(str, object)

    def __init__(self) -> None:
        super().__init__()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._client: Client | None = None
        self._jobs: dict[str, Job] = {}  # by the plugin's job key; worker thread only
        self._worker = threading.Thread(target=self._run, name="sdbridge-krita", daemon=True)
        self._worker.start()

    def set_address(self, address: str, token: str) -> None:
        """(Re)connects; call it after connecting the signals, or the first news is lost.
        `token`: the daemon's secret, when it requires one ("" for none)."""
        self._tasks.put(lambda: self._open(address, token))

    def generate(self, key: str, fields: dict[str, Any]) -> None:
        self._tasks.put(lambda: self._generate(key, fields))

    def cancel(self, key: str) -> None:
        self._tasks.put(lambda: self._cancel(key))

    # --- worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        # Lives as long as Krita (a daemon thread): the sockets close when Krita exits.
        while True:
            task = self._tasks.get()
            try:
                task()
            except Exception:  # one failed request must not stop all later ones
                _log.exception("sdbridge-krita: a connection task failed")

    def _open(self, address: str, token: str) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._jobs.clear()
        try:
            self._client = Client(
                address,
                timeout=10.0,
                client_name=CLIENT_NAME,
                on_state=lambda up, detail: self._on_state(address, bool(token), up, detail),
                token=token or None,
            )
        except ValueError as exc:
            text = f"“{address}” is not a daemon address; use tcp://HOST:PORT."
            self.state_changed.emit(False, text, str(exc))
        # No hello here: the client reports its first connection through on_state, which
        # queues one.

    def _on_state(self, address: str, has_token: bool, connected: bool, detail: str) -> None:
        # Runs on the client's reader thread, which must not wait for answers: hand over.
        if connected:
            self.state_changed.emit(True, f"Connected to {address}", detail)
            self._tasks.put(self._hello)
        elif AUTH_REFUSED.search(detail):
            text = (
                f"The daemon at {address} did not accept the token; check it and press Connect."
                if has_token
                else f"The daemon at {address} needs a token: type it below and press Connect."
            )
            self.state_changed.emit(False, text, detail)
        else:
            text = (
                f"No sdbridge daemon at {address}. Start it with `sdbridge serve`; "
                "the plugin keeps trying."
            )
            self.state_changed.emit(False, text, detail)

    def _hello(self) -> None:
        if self._client is None:
            return
        try:
            self.hello_received.emit(self._client.hello())
        except ClientError as exc:
            text = f"The daemon at {self._client.address} does not answer."
            self.state_changed.emit(False, text, exc.message)

    def _generate(self, key: str, fields: dict[str, Any]) -> None:
        if self._client is None:
            self._fail(key, ErrorCode.CONNECTION_LOST, "not connected to the sdbridge daemon")
            return
        try:
            job = self._client.generate(**fields)
        except ClientError as exc:
            self._fail(key, exc.code, exc.message)
            return
        self._jobs[key] = job
        job.subscribe(lambda event: self._on_job_event(key, event))

    def _on_job_event(self, key: str, event: dict[str, Any]) -> None:
        self.job_event.emit(key, event)
        if event.get("event") in TERMINAL_EVENTS:
            self._tasks.put(lambda: self._jobs.pop(key, None))

    def _cancel(self, key: str) -> None:
        job = self._jobs.get(key)
        if job is not None:
            job.cancel()

    def _fail(self, key: str, code: str, message: str) -> None:
        self.job_event.emit(key, error_event(key, ProtocolError(code, message)))
