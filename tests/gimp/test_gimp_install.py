"""`sdbridge install gimp` / `sdbridge package gimp`: the layout GIMP 3 registers (no GIMP
needed; the `gimp`-marked tests run the installed copy inside the real GIMP)."""

from __future__ import annotations

import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from sdbridge import cli, install

PLUGIN = "sdbridge_gimp/sdbridge_gimp.py"


def test_install_gimp_puts_an_executable_plugin_in_the_gimp3_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GIMP3_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert cli.main(["install", "gimp"]) == 0
    assert "Filters > sdbridge" in capsys.readouterr().out
    plugins = tmp_path / "config" / "GIMP" / "3.0" / "plug-ins"
    script = plugins / PLUGIN
    # GIMP silently skips a plug-in that is not executable.
    assert script.is_file() and os.access(script, os.X_OK)
    for name in ("sdbridge/wire/client.py", "sdbridge/editor/canvas.py", "msgpack/fallback.py"):
        assert (plugins / "sdbridge_gimp" / "vendor" / name).is_file(), name
    # The folder must not be called `sdbridge`: it would shadow the vendored package.
    assert not (plugins / "sdbridge").exists()


@pytest.mark.parametrize(
    ("platform", "env", "expected"),
    [
        ("linux", {}, "~/.config/GIMP/3.0/plug-ins"),
        ("linux", {"XDG_CONFIG_HOME": "/x/conf"}, "/x/conf/GIMP/3.0/plug-ins"),
        ("linux", {"GIMP3_DIRECTORY": "/x/profile"}, "/x/profile/plug-ins"),
        ("win32", {"APPDATA": "C:/U/AppData/Roaming"}, "C:/U/AppData/Roaming/GIMP/3.0/plug-ins"),
        ("darwin", {}, "~/Library/Application Support/GIMP/3.0/plug-ins"),
    ],
)
def test_gimp_plugin_folder_per_platform(
    monkeypatch: pytest.MonkeyPatch, platform: str, env: dict[str, str], expected: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    for name in ("XDG_CONFIG_HOME", "APPDATA", "GIMP3_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert install.gimp_plugins_dir() == Path(expected).expanduser()


def test_package_gimp_is_a_zip_to_unpack_into_plug_ins(tmp_path: Path) -> None:
    assert cli.main(["package", "gimp", "-o", str(tmp_path)]) == 0
    (archive,) = tmp_path.glob("sdbridge_gimp-*.zip")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        mode = zf.getinfo(PLUGIN).external_attr >> 16
    assert PLUGIN in names and "sdbridge_gimp/vendor/sdbridge/wire/zmtp.py" in names
    assert {n.split("/")[0] for n in names} == {"sdbridge_gimp"}
    assert mode & stat.S_IXUSR, "unzip must restore the run bit GIMP needs"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".so")]
