"""One real Krita per test session, under Xvfb, driven through a test-only plugin.

The driver plugin (tests/krita/driver) runs Python sent over a loopback socket on Krita's GUI
thread and answers with JSON. The sdbridge plugin is installed the way users install it
(`sdbridge.install`). A fresh Krita profile costs ~30 s to build its resource database, so one
is made once per machine (cached) and copied for each session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdbridge import install

DRIVER = Path(__file__).parent / "driver"
CACHE = Path(os.environ.get("SDBRIDGE_TEST_CACHE") or Path.home() / ".cache" / "sdbridge-tests")
START_TIMEOUT = 120.0


class KritaError(AssertionError):
    """Code sent into Krita raised; the message is the traceback from inside Krita."""


def krita_missing() -> str | None:
    for tool in ("krita", "xvfb-run"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup_krita.sh installs it)"
    return None


class Krita:
    """A running Krita and the socket that reaches its GUI thread."""

    def __init__(self, profile: Path, log: Path) -> None:
        self.profile = profile
        self.port_file = profile / "driver-port"
        self.log = log
        env = {
            **os.environ,
            "HOME": str(profile / "home"),
            "XDG_CONFIG_HOME": str(profile / "config"),
            "XDG_DATA_HOME": str(profile / "data"),
            "XDG_CACHE_HOME": str(profile / "cache"),
            "XDG_RUNTIME_DIR": str(profile / "run"),
            "SDBRIDGE_DRIVER_PORT_FILE": str(self.port_file),
        }
        (profile / "run").mkdir(mode=0o700, exist_ok=True)
        command = [
            "timeout",
            "-k",
            "10",
            "1800",
            "xvfb-run",
            "-a",
            "-s",
            "-screen 0 1600x1000x24",
            "krita",
            "--nosplash",
        ]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Krita did not start its test driver:\n{self.log_tail()}")
            time.sleep(0.2)
        self.port = int(self.port_file.read_text())
        self.wait_for("app.activeWindow() is not None", timeout=60)

    def run(self, code: str, timeout: float = 30.0) -> Any:
        """Runs `code` on Krita's GUI thread; returns what it put in `result`."""
        body = json.dumps({"code": textwrap.dedent(code)}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">I", len(body)) + body)
            (size,) = struct.unpack(">I", _read(sock, 4))
            answer = json.loads(_read(sock, size))
        if not answer["ok"]:
            raise KritaError(answer["error"])
        return answer["result"]

    def eval(self, expression: str, timeout: float = 30.0) -> Any:
        return self.run(f"result = {expression}", timeout)

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Polls a Python expression inside Krita until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout} s: {expression}")
            time.sleep(0.1)

    def connect(self, address: str, token: str = "", expect: str = "") -> None:
        """Types the address and token into the docker, presses Connect, waits for `expect`."""
        self.run(f"dock().address.setText({address!r}); dock().token.setText({token!r})")
        self.run("dock().findChild(QPushButton, 'sdbridge_connect').click()")
        expect = expect or f"Connected to {address}"
        self.wait_for(f"{expect!r} in dock().connection.text()", timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def quit(self) -> None:
        """Krita's own quit path; unsaved documents would open a modal box, so drop them."""
        try:
            self.run(
                """
                for d in app.documents():
                    d.setModified(False)
                app.action("file_quit").trigger()
                """,
                timeout=10,
            )
            self.process.wait(30)
        except (OSError, AssertionError, subprocess.TimeoutExpired):
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("Krita closed the driver connection")
        data += chunk
    return data


def _new_profile(path: Path) -> None:
    for sub in ("home", "config", "data/krita/pykrita", "cache"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def _enable(profile: Path, plugin: str) -> None:
    kritarc = profile / "config" / "kritarc"
    text = kritarc.read_text() if kritarc.exists() else ""
    kritarc.write_text(install.set_ini_value(text, "python", f"enable_{plugin}", "true"))


def _install_driver(profile: Path) -> None:
    pykrita = profile / "data" / "krita" / "pykrita"
    shutil.copytree(
        DRIVER / "sdbridge_test_driver", pykrita / "sdbridge_test_driver", dirs_exist_ok=True
    )
    shutil.copy2(DRIVER / "sdbridge_test_driver.desktop", pykrita)
    _enable(profile, "sdbridge_test_driver")


def profile_template(log: Path) -> Path:
    """A Krita profile that has been started once (resource database built), made once."""
    version = (
        subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "krita"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    # Krita joins plugin folders into a ':'-separated path: keep ':' (Debian epochs) out.
    template = CACHE / f"krita-profile-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}"
    if (template / "ready").exists():
        return template
    building = template.with_name(f"{template.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    _new_profile(building)
    _install_driver(building)
    Krita(building, log).quit()
    for leftover in ("driver-port", "run"):
        path = building / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (building / "ready").write_text("")
    shutil.rmtree(template, ignore_errors=True)
    building.rename(template)
    return template


def plugin_profile(profile: Path, log: Path) -> Path:
    """A copy of the template profile with the sdbridge plugin installed as users install it."""
    shutil.copytree(profile_template(log), profile, symlinks=True)
    install.install("krita", plugins_dir=profile / "data" / "krita" / "pykrita", enable=False)
    _enable(profile, "sdbridge_krita")
    return profile


def start_krita(profile: Path, address: str) -> Krita:
    """Krita on `profile`, its docker pointed at the daemon at `address`, the helpers loaded."""
    kritarc = profile / "config" / "kritarc"
    kritarc.write_text(install.set_ini_value(kritarc.read_text(), "sdbridge", "address", address))
    app = Krita(profile, profile.parent / "krita.log")
    app.run(DOCKER_HELPERS)
    return app


@pytest.fixture(scope="session")
def krita_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = krita_missing()
    if reason:
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("krita-logs")
    return plugin_profile(tmp_path_factory.mktemp("krita") / "profile", logs / "template.log")


@pytest.fixture(scope="session")
def krita(krita_profile: Path, daemon) -> Iterator[Krita]:
    """Krita with the sdbridge plugin, pointed at the session's daemon."""
    app = start_krita(krita_profile, daemon.address)
    yield app
    app.quit()


# Runs once inside Krita: names the tests use to reach the docker and documents.
DOCKER_HELPERS = """
from PyQt5.QtCore import QEventLoop, QPoint, Qt, QTimer
from PyQt5.QtWidgets import QDockWidget, QLabel, QPushButton, QScrollArea, QWidget
from krita import Selection

def dock():
    return app.activeWindow().qwindow().findChild(QDockWidget, "sdbridge_docker")

def settle(ms=300):
    # Krita 5.1 crashes when a delayed canvas update reaches an OpenGL canvas that is not shown
    # yet or already closed: let the event loop run those updates before a view comes or goes.
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec_()

def new_document(width, height, bgra_fill):
    doc = app.createDocument(width, height, "sdbridge-test", "RGBA", "U8", "", 72.0)
    app.activeWindow().addView(doc)
    background = doc.rootNode().childNodes()[0]
    background.setPixelData(bytes(bgra_fill) * (width * height), 0, 0, width, height)
    doc.refreshProjection()
    doc.waitForDone()
    state["doc"] = doc
    settle()
    return doc

def close_documents():
    settle()
    for d in app.documents():
        d.setModified(False)
        d.close()

def layers():
    # A selection shows up as a "Selection Mask" node: not a layer the plugin made.
    return [(n.name(), n.type(), list(n.bounds().getRect()))
            for n in state["doc"].rootNode().childNodes() if n.type() != "selectionmask"]

def record(model):
    seen = state["seen"] = {"progress": [], "previews": 0, "messages": []}
    model.progress_changed.connect(lambda step, total: seen["progress"].append([step, total]))
    model.preview_changed.connect(lambda image: seen.__setitem__("previews", seen["previews"] + 1))
    model.message_changed.connect(lambda text, error: seen["messages"].append([text, error]))

state.update(dock=dock, new_document=new_document, close_documents=close_documents,
             layers=layers, record=record, settle=settle, Selection=Selection,
             QPushButton=QPushButton, QPoint=QPoint, Qt=Qt, QScrollArea=QScrollArea,
             QLabel=QLabel, QWidget=QWidget)
"""
