"""Where the editor side keeps the artist's files, and the session key kept there.

Pure Python: it runs inside Krita and GIMP.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..wire.client import new_session_key
from ..wire.protocol import MAX_ID_CHARS, MIN_SESSION_CHARS

SESSION_KEY_FILE = "session-key"


def config_dir() -> Path:
    """This user's sdbridge config folder (XDG on Linux, AppData, Application Support)."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return base / "sdbridge"


def session_key(path: Path | None = None) -> str:
    """This user's session key: the same in Krita, GIMP and the CLI, and after a restart, so
    that the daemon's `results` lists what any of them made. Drawn at random on first use and
    kept in a file only this user can read; a daemon with a token shows a connection no
    results of another key."""
    path = path or config_dir() / SESSION_KEY_FILE
    key = _read_key(path)
    if key is not None:
        return key
    key = new_session_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Exclusive: when Krita and GIMP draw one at the same moment, the first one written wins.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path) or _replace_key(path, key)  # another's, or a damaged one
    except OSError:  # a read-only home: this run keeps its results together all the same
        return key
    with os.fdopen(descriptor, "w", encoding="ascii") as out:
        out.write(key + "\n")
    return key


def _replace_key(path: Path, key: str) -> str:
    temporary = path.with_name(f".{path.name}-{os.getpid()}")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            out.write(key + "\n")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
    return key


def _read_key(path: Path) -> str | None:
    try:
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return key if MIN_SESSION_CHARS <= len(key) <= MAX_ID_CHARS else None
