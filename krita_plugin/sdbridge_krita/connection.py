"""The daemon connection, kept off Krita's GUI thread.

Opening a `Session` (it connects), asking the daemon what it offers (`hello`, `models`) and
which results it saved (`results`) wait for the network, so they run on one worker thread fed by
a queue. Jobs need no worker: a
`Generation` sends and cancels on threads of its own. News reaches the GUI thread as Qt
signals, which Qt queues because the emitting thread is not the one this object lives in.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from PyQt5.QtCore import QObject, pyqtSignal

from sdbridge import __version__
from sdbridge.editor.config import session_key
from sdbridge.editor.history import own_results, with_images
from sdbridge.editor.session import Generation, Session, ViewCallback
from sdbridge.wire.client import ClientError, Link
from sdbridge.wire.protocol import MAX_RESULTS_PAGE

CLIENT_NAME = f"sdbridge-krita/{__version__}"
RECENT_RESULTS = 20  # how far back a lost job's results are looked for
_log = logging.getLogger(__name__)


class Connection(QObject):
    # (connected, a sentence for the artist, the technical detail)
    state_changed = pyqtSignal(bool, str, str)
    # the daemon's offer: a session.DaemonInfo
    info_received = pyqtSignal(object)
    # a results.ResultsPage with the images of lost jobs, or None when the daemon did not answer
    results_received = pyqtSignal(object)
    # A daemon's address and the artist's newest results there (SavedResults with their images,
    # newest first), once per address in a Krita run: an earlier Krita's, GIMP's, the CLI's.
    restored = pyqtSignal(str, object)

    def __init__(self) -> None:
        super().__init__()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _session: the GUI thread submits through it
        self._session: Session | None = None
        self._restored: set[str] = set()  # the worker's: the addresses it restored results of
        self._worker = threading.Thread(target=self._run, name="sdbridge-krita", daemon=True)
        self._worker.start()

    def set_address(self, address: str, token: str) -> None:
        """(Re)connects; call it after connecting the signals, or the first news is lost.
        `token`: the daemon's secret, when it requires one ("" for none)."""
        self._tasks.put(lambda: self._open(address, token))

    def refresh(self) -> None:
        """Asks the daemon again for its models and defaults (new files in its folders)."""
        self._tasks.put(self._ask_info)

    def look_for(self, jobs: frozenset[str]) -> None:
        """Looks for the images of these jobs (request ids) in the daemon's saved results."""
        self._tasks.put(lambda: self._look_for(jobs))

    def submit(self, fields: Mapping[str, Any], on_view: ViewCallback) -> Generation | None:
        """Sends a job (at once, from the GUI thread); None when there is no session."""
        with self._lock:
            session = self._session
        return None if session is None else session.submit(fields, on_view)

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
        with self._lock:
            old, self._session = self._session, None
        if old is not None:
            old.close()
        try:
            session = Session(
                address, token, CLIENT_NAME, on_link=self._on_link, session_key=session_key()
            )
        except ValueError as exc:
            text = f"“{address}” is not a daemon address; use tcp://HOST:PORT."
            self.state_changed.emit(False, text, str(exc))
            return
        with self._lock:
            self._session = session  # before the info task that its first on_link queued

    def _on_link(self, link: Link, text: str, detail: str) -> None:
        # On the client's reader thread, which must not wait for answers: hand over.
        self.state_changed.emit(link is Link.CONNECTED, text, detail)
        if link is Link.CONNECTED:
            self._tasks.put(self._ask_info)

    def _ask_info(self) -> None:
        with self._lock:
            session = self._session
        if session is None or session.link is not Link.CONNECTED:
            return
        try:
            info = session.info()
        except ClientError as exc:
            text = f"The daemon at {session.address} does not answer."
            self.state_changed.emit(False, text, exc.message)
            return
        self.info_received.emit(info)
        if "results" in info.capabilities and session.address not in self._restored:
            self._restore(session)

    def _restore(self, session: Session) -> None:
        # Once per address: a reconnection (a daemon restart, a laptop's sleep) brings nothing
        # back that the history does not already hold, and its images cost a fetch.
        try:
            # The list without images first: on a daemon without a token it holds everyone's.
            page = with_images(session, own_results(session.results(limit=MAX_RESULTS_PAGE)))
            found = own_results(page) if page else ()
        except ClientError as exc:  # the next connection tries again
            _log.warning("sdbridge-krita: fetching earlier results failed: %s", exc.message)
            return
        self._restored.add(session.address)
        self.restored.emit(session.address, found)

    def _look_for(self, jobs: frozenset[str]) -> None:
        with self._lock:
            session = self._session
        page = None
        if session is not None and session.link is Link.CONNECTED:
            try:
                # The newest results without their images first: most looks find nothing.
                listed = session.results(limit=RECENT_RESULTS)
                wanted = [saved for saved in listed.results if saved.job in jobs]
                page = with_images(session, wanted) or listed
            except ClientError as exc:
                _log.warning("sdbridge-krita: looking for lost results failed: %s", exc.message)
        self.results_received.emit(page)
