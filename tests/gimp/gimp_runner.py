"""Runs the real GIMP 3 (Debian trixie) in the chroot that scripts/setup_gimp.sh builds.

Each run executes Python batch code inside GIMP (`python-fu-eval`), with gimp_batch.py's
helpers in front of it, and reads back what that code recorded: a JSON file of markers and
any files it exported. The chroot shares the host's network, so a daemon listening on the
host's loopback is reachable from the plug-in. No run needs anything mounted in the chroot (GIMP's
GUI only warns that /proc/mounts is missing), so there is nothing to unmount afterwards.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbridge.install import install

CACHE = Path(os.environ.get("SDBRIDGE_CACHE", "/var/cache/sdbridge"))
ROOT = CACHE / "gimp-trixie"
STAMP = CACHE / "gimp-trixie.ready"  # written by setup_gimp.sh once the chroot is complete
PROFILE_TEMPLATE = "opt/sdbridge/gimp-profile"  # pre-warmed by setup_gimp.sh
BATCH_HELPERS = Path(__file__).with_name("gimp_batch.py")
SCREEN = "-screen 0 1280x800x24"
CHROOT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
KILL_GRACE = 5  # `timeout -k`: SIGKILL this long after SIGTERM


def chroot_missing() -> str | None:
    """Why the GIMP tests cannot run here, or None."""
    if not STAMP.exists() or not (ROOT / "usr/bin/gimp-console-3.0").exists():
        return f"no GIMP 3 chroot at {ROOT}: run scripts/setup_gimp.sh (root, ~2 min once)"
    return None


@dataclass(frozen=True)
class GimpRun:
    returncode: int
    markers: dict[str, Any]
    log: str
    seconds: float

    def checked(self) -> dict[str, Any]:
        """The markers of a run whose batch code got to its end, else a failure with the log."""
        if self.returncode != 0 or not self.markers.get("done"):
            raise AssertionError(
                f"GIMP run failed (rc {self.returncode}, markers {self.markers}):\n"
                + self.log[-4000:]
            )
        return self.markers


class Gimp:
    """One GIMP profile (a copy of the pre-warmed template) in a folder under the chroot's /tmp,
    with the plug-in installed by `sdbridge install gimp`, or unpacked from the zip of
    `sdbridge package gimp` as a user would."""

    def __init__(self, root: Path = ROOT, archive: Path | None = None) -> None:
        self.root = root
        self.host_dir = Path(tempfile.mkdtemp(prefix="sdbridge-gimp-", dir=root / "tmp"))
        self.inner_dir = "/" + self.host_dir.relative_to(root).as_posix()
        profile = self.host_dir / "profile"
        shutil.copytree(root / PROFILE_TEMPLATE, profile, symlinks=True)
        if archive is None:
            install("gimp", plugins_dir=profile / "plug-ins")
        else:  # unzip restores the run bit GIMP needs (Python's zipfile would not)
            subprocess.run(
                ["unzip", "-q", str(archive), "-d", str(profile / "plug-ins")], check=True
            )
        self.plugin_dir = self.inner("profile/plug-ins/sdbridge_gimp")
        self._runs = itertools.count(1)

    def inner(self, name: str) -> str:
        """The chroot's path of a file in this profile's folder."""
        return f"{self.inner_dir}/{name}"

    def host(self, name: str) -> Path:
        """The host's path of a file in this profile's folder."""
        return self.host_dir / name

    def run(
        self,
        code: str,
        timeout: float = 60.0,
        display: bool = False,
        gui: bool = False,
        env: dict[str, str] | None = None,
    ) -> GimpRun:
        """Runs `code` in GIMP: `gimp-console-3.0` headless, under Xvfb with `display` (for
        dialogs), or the full `gimp-3.0` window with `gui`, with `env` added to GIMP's (and its
        plug-ins') environment. Always bounded by `timeout`."""
        number = next(self._runs)
        markers = self.host(f"markers-{number}.json")
        script = self.host(f"drive-{number}.py")
        script.write_text(
            f"MARKERS = {self.inner(markers.name)!r}\n"
            f"PLUGIN_DIR = {self.plugin_dir!r}\n"
            f"WORK = {self.inner_dir!r}\n"
            + BATCH_HELPERS.read_text()
            + "\n"
            + textwrap.dedent(code)
            + "\nmark(done=True)\n"
        )
        # A clean environment: the host's (XDG_* set by tests/conftest.py, say) means nothing
        # inside the chroot, and everything GIMP writes then stays in this profile's folder.
        command = ["chroot", str(self.root), "env", "-i", f"PATH={CHROOT_PATH}"]
        command += [f"HOME={self.inner_dir}"]
        command += [f"GIMP3_DIRECTORY={self.inner('profile')}", "NO_AT_BRIDGE=1"]
        command += [f"{name}={value}" for name, value in (env or {}).items()]
        command += ["timeout", "-k", str(KILL_GRACE), str(timeout)]
        if display or gui:
            command += ["xvfb-run", "-a", "-s", SCREEN]
        command += ["gimp-3.0", "--no-splash"] if gui else ["gimp-console-3.0", "-i"]
        command += ["-n", "--batch-interpreter", "python-fu-eval"]
        command += ["-b", f"exec(open({self.inner(script.name)!r}).read())", "--quit"]
        start = time.monotonic()
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout + KILL_GRACE + 10,  # `timeout` inside should always win
        )
        seconds = time.monotonic() - start
        found = json.loads(markers.read_text()) if markers.exists() else {}
        log = done.stdout + done.stderr
        # pytest shows captured output only when a test fails: GIMP's log is then at hand.
        print(f"--- GIMP run {number}: rc {done.returncode}, {seconds:.1f} s ---\n{log}")
        return GimpRun(done.returncode, found, log, seconds)

    def remove(self) -> None:
        shutil.rmtree(self.host_dir, ignore_errors=True)
