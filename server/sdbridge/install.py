"""`sdbridge install TARGET` and `sdbridge package TARGET`: put an editor plugin where the editor
looks for it, together with everything it imports.

The editors' own Pythons have no pyzmq and may have no msgpack, so each plugin gets a `vendor`
folder with the pure sdbridge modules and msgpack's pure-Python files (msgpack falls back to
them when its C extension is absent). The plugin puts that folder first on `sys.path`.

The plugins' own sources come from `sdbridge/plugins/` in an installed wheel (setup.py puts them
there) or from the top of the checkout (which an editable install also runs from).

Each editor is one `Target` row in `TARGETS`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack

import sdbridge

_PACKAGE_DIR = Path(__file__).resolve().parent
# Where `krita_plugin/` and `gimp_plugin/` are: the wheel's copy inside the package, else the
# checkout's top (server/sdbridge/../..), where an editable install finds them.
PLUGINS_ROOT = (
    _PACKAGE_DIR / "plugins" if (_PACKAGE_DIR / "plugins").is_dir() else _PACKAGE_DIR.parents[1]
)
# The layers that run inside the editors (pure Python), copied whole with the package root.
PURE_PACKAGES = ("wire", "editor")
MSGPACK_FILES = ("__init__.py", "exceptions.py", "ext.py", "fallback.py")
VENDOR = "vendor"


@dataclass(frozen=True)
class Target:
    name: str
    source: Path  # the plugin's folder under PLUGINS_ROOT
    folder: str  # the plugin's folder name inside the editor's plugin folder
    plugins_dir: Callable[[], Path]  # where the editor looks, for this user and platform
    extra_files: tuple[str, ...] = ()  # files beside `source` that go beside the folder
    executable: str | None = None  # a file in the folder that needs the run bit
    enable: Callable[[], str] | None = None  # switches the plugin on; returns what it did
    next_step: str = ""  # what the user does after installing


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def _platform_dir(linux: Path, windows_env: str, windows_tail: str, macos: Path) -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get(windows_env) or _home() / "AppData" / "Roaming") / windows_tail
    if sys.platform == "darwin":
        return macos
    return linux


def krita_plugins_dir() -> Path:
    data = Path(os.environ.get("XDG_DATA_HOME") or _home() / ".local" / "share")
    mac = _home() / "Library" / "Application Support" / "krita" / "pykrita"
    return _platform_dir(data / "krita" / "pykrita", "APPDATA", "krita/pykrita", mac)


def kritarc_path() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or _home() / "AppData" / "Local") / "kritarc"
    if sys.platform == "darwin":
        return _home() / "Library" / "Preferences" / "kritarc"
    return Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config") / "kritarc"


def set_ini_value(text: str, section: str, key: str, value: str) -> str:
    """Sets one key in INI text, leaving every other line as it was: kritarc is KConfig, whose
    group names, escapes and duplicate keys a rewrite through configparser could mangle."""
    lines = text.splitlines()
    header = f"[{section}]"
    entry = f"{key}={value}"
    try:
        start = lines.index(header)
    except ValueError:
        if lines and lines[-1].strip():
            lines.append("")
        return "\n".join([*lines, header, entry]) + "\n"
    end = start + 1
    while end < len(lines) and not lines[end].startswith("["):
        end += 1
    pattern = re.compile(rf"\s*{re.escape(key)}\s*=")
    for i in range(start + 1, end):
        if pattern.match(lines[i]):
            lines[i] = entry
            break
    else:
        lines.insert(start + 1, entry)
    return "\n".join(lines) + "\n"


def enable_krita_plugin() -> str:
    """Krita loads a Python plugin only when kritarc says `enable_<name>=true` under [python]."""
    path = kritarc_path()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(set_ini_value(text, "python", "enable_sdbridge_krita", "true"), "utf-8")
    return f"enabled in {path}"


def gimp_plugins_dir() -> Path:
    """`plug-ins` in the GIMP 3 profile; GIMP3_DIRECTORY moves the whole profile."""
    profile = os.environ.get("GIMP3_DIRECTORY")
    if profile:
        return Path(profile) / "plug-ins"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config")
    mac = _home() / "Library" / "Application Support" / "GIMP" / "3.0" / "plug-ins"
    return _platform_dir(config / "GIMP" / "3.0" / "plug-ins", "APPDATA", "GIMP/3.0/plug-ins", mac)


TARGETS: dict[str, Target] = {
    "krita": Target(
        name="krita",
        source=PLUGINS_ROOT / "krita_plugin" / "sdbridge_krita",
        folder="sdbridge_krita",
        plugins_dir=krita_plugins_dir,
        extra_files=("sdbridge_krita.desktop",),
        enable=enable_krita_plugin,
        next_step="Restart Krita, then open Settings > Dockers > sdbridge.",
    ),
    # GIMP registers plug-ins/<name>/<name>.py only if it is executable; no switch to flip.
    "gimp": Target(
        name="gimp",
        source=PLUGINS_ROOT / "gimp_plugin" / "sdbridge_gimp",
        folder="sdbridge_gimp",
        plugins_dir=gimp_plugins_dir,
        executable="sdbridge_gimp.py",
        next_step="Restart GIMP, then use Filters > sdbridge (with `sdbridge serve` running).",
    ),
}


def _target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    target = TARGETS[name]
    if not target.source.is_dir():
        raise FileNotFoundError(
            f"the {name} plugin sources are not at {target.source}; "
            "reinstall sdbridge from its wheel or a checkout of the repository"
        )
    return target


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith(".pyc") or n == VENDOR}


def _assemble(target: Target, dest: Path) -> Path:
    """Writes the plugin folder, its vendor folder and the extra files into `dest`."""
    folder = dest / target.folder
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(target.source, folder, ignore=_ignore)
    vendor_sdbridge = folder / VENDOR / "sdbridge"
    vendor_msgpack = folder / VENDOR / "msgpack"
    vendor_sdbridge.mkdir(parents=True)
    vendor_msgpack.mkdir()
    package_dir = Path(sdbridge.__file__).parent
    shutil.copy2(package_dir / "__init__.py", vendor_sdbridge / "__init__.py")
    for name in PURE_PACKAGES:
        shutil.copytree(package_dir / name, vendor_sdbridge / name, ignore=_ignore)
    msgpack_dir = Path(msgpack.__file__).parent
    for name in MSGPACK_FILES:
        shutil.copy2(msgpack_dir / name, vendor_msgpack / name)
    for name in target.extra_files:
        shutil.copy2(target.source.parent / name, dest / name)
    if target.executable:
        script = folder / target.executable
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def install(target: str, plugins_dir: Path | None = None, enable: bool = True) -> list[str]:
    """Installs the plugin for `target` (default: the editor's folder for this user) and
    switches it on. Returns lines saying what was done, for the CLI to print."""
    spec = _target(target)
    dest = Path(plugins_dir) if plugins_dir else spec.plugins_dir()
    dest.mkdir(parents=True, exist_ok=True)
    folder = _assemble(spec, dest)
    done = [f"installed the {target} plugin in {folder}"]
    if enable and spec.enable:
        done.append(spec.enable())
    if spec.next_step:
        done.append(spec.next_step)
    return done


def package(target: str, out_dir: Path) -> Path:
    """A zip of the installed layout (for Krita: what Tools > Scripts > Import Python Plugin
    from File expects, the .desktop file and the plugin folder at the top)."""
    spec = _target(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{spec.folder}-{sdbridge.__version__}.zip"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _assemble(spec, root)
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(root.rglob("*")):
                name = path.relative_to(root).as_posix()
                if path.is_dir():
                    zf.writestr(name + "/", b"")  # Krita's importer looks for the folder entry
                else:
                    zf.write(path, name)
    return archive
