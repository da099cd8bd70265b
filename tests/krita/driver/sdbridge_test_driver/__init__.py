"""Test-only Krita plugin: runs Python code sent by the test suite on Krita's GUI thread.

Listens on a loopback port it writes to $SDBRIDGE_DRIVER_PORT_FILE. A request is a 4-byte
big-endian length and a JSON map {"code": str}; the code runs with `Krita`, `app`, the
persistent dict `state` and every entry of `state` in scope, and may set `result` (JSON-able).
The answer is framed the same way: {"ok": bool, "result": ..., "error": traceback text}.
QTcpServer lives on the GUI thread, so a frozen GUI shows up as an unanswered request.
"""

import json
import os
import struct
import traceback

from krita import Krita
from PyQt5.QtNetwork import QHostAddress, QTcpServer

state: dict = {}


class _Driver:
    def __init__(self) -> None:
        self.server = QTcpServer()
        self.server.newConnection.connect(self._accept)
        if not self.server.listen(QHostAddress.LocalHost, 0):
            raise RuntimeError(self.server.errorString())
        path = os.environ["SDBRIDGE_DRIVER_PORT_FILE"]
        with open(path + ".tmp", "w") as f:
            f.write(str(self.server.serverPort()))
        os.replace(path + ".tmp", path)
        self.buffers: dict = {}

    def _accept(self) -> None:
        while self.server.hasPendingConnections():
            sock = self.server.nextPendingConnection()
            self.buffers[sock] = b""
            sock.readyRead.connect(lambda s=sock: self._read(s))
            sock.disconnected.connect(lambda s=sock: self.buffers.pop(s, None))

    def _read(self, sock) -> None:
        self.buffers[sock] += bytes(sock.readAll())
        while len(self.buffers[sock]) >= 4:
            (size,) = struct.unpack(">I", self.buffers[sock][:4])
            if len(self.buffers[sock]) < 4 + size:
                return
            body = self.buffers[sock][4 : 4 + size]
            self.buffers[sock] = self.buffers[sock][4 + size :]
            answer = json.dumps(self._run(json.loads(body)["code"]), default=repr).encode()
            sock.write(struct.pack(">I", len(answer)) + answer)
            sock.flush()

    def _run(self, code: str) -> dict:
        scope = {**state, "Krita": Krita, "app": Krita.instance(), "state": state}
        try:
            exec(code, scope)
        except Exception:
            return {"ok": False, "result": None, "error": traceback.format_exc()}
        return {"ok": True, "result": scope.get("result"), "error": ""}


if os.environ.get("SDBRIDGE_DRIVER_PORT_FILE"):
    _driver = _Driver()
