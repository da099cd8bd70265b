"""`sdbridge install` / `sdbridge package`: the plugin lands where the editor looks, switched on,
with everything it imports."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sdbridge
from sdbridge import cli, install

REPO = Path(__file__).resolve().parents[1]
KRITA_IMPORTER = Path("/usr/share/krita/pykrita/plugin_importer/plugin_importer.py")


@pytest.fixture
def linux_home(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def test_install_krita_puts_the_plugin_in_pykrita_and_enables_it(linux_home, capsys):
    kritarc = linux_home / "config" / "kritarc"
    kritarc.parent.mkdir(parents=True)
    kritarc.write_text("[General]\nfoo=1\n\n[python]\nenable_sdbridge_krita=false\nenable_x=true\n")
    assert cli.main(["install", "krita"]) == 0
    assert "Restart Krita" in capsys.readouterr().out
    pykrita = linux_home / "data" / "krita" / "pykrita"
    assert (pykrita / "sdbridge_krita.desktop").is_file()
    for name in (
        "__init__.py",
        "docker.py",
        "vendor/sdbridge/wire/client.py",
        "vendor/msgpack/fallback.py",
    ):
        assert (pykrita / "sdbridge_krita" / name).is_file(), name
    text = kritarc.read_text()
    assert "[General]\nfoo=1\n" in text and "enable_x=true" in text
    assert text.count("enable_sdbridge_krita") == 1 and "enable_sdbridge_krita=true" in text
    # Installing again replaces the old copy and keeps kritarc as it is.
    assert cli.main(["install", "krita"]) == 0
    assert kritarc.read_text() == text


def test_kritarc_without_a_python_section_gets_one(linux_home):
    install.enable_krita_plugin()
    assert (linux_home / "config" / "kritarc").read_text() == (
        "[python]\nenable_sdbridge_krita=true\n"
    )


@pytest.mark.parametrize(
    ("platform", "env", "plugins", "kritarc"),
    [
        ("win32", {"APPDATA": "C:/U/AppData/Roaming", "LOCALAPPDATA": "C:/U/AppData/Local"},
         "C:/U/AppData/Roaming/krita/pykrita", "C:/U/AppData/Local/kritarc"),
        ("darwin", {}, "~/Library/Application Support/krita/pykrita",
         "~/Library/Preferences/kritarc"),
        ("linux", {}, "~/.local/share/krita/pykrita", "~/.config/kritarc"),
    ],
)  # fmt: skip
def test_krita_folders_per_platform(monkeypatch, platform, env, plugins, kritarc):
    monkeypatch.setattr(sys, "platform", platform)
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "APPDATA", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert install.krita_plugins_dir() == Path(plugins).expanduser()
    assert install.kritarc_path() == Path(kritarc).expanduser()


# Run in `python -I -S` (no site-packages): only the vendor folder and the standard library are
# there, and importing what the editors' Pythons lack fails even if a system path provides it.
PURE_IMPORTS = """
import importlib, sys
from pathlib import Path

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "numpy", "PIL", "zmq"}:
            raise ImportError(f"{name} is not in an editor's Python")

sys.meta_path.insert(0, Blocked())
vendor = Path(sys.argv[1])
sys.path.insert(0, str(vendor))
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    assert Path(module.__file__).is_relative_to(vendor), module.__file__
import msgpack
from sdbridge.wire import protocol
assert msgpack.Packer.__module__ == "msgpack.fallback", msgpack.Packer.__module__
assert protocol.unpack(protocol.pack({"a": b"x" * 300})) == {"a": b"x" * 300}
print("imported", *sys.argv[2:])
"""


def pure_modules() -> list[str]:
    """Every module of the layers that run in the editors, found by listing their folders, so a
    module added there is checked without naming it here."""
    root = Path(sdbridge.__file__).parent
    names = []
    for package in install.PURE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def assert_vendor_imports_alone(vendor: Path) -> None:
    modules = pure_modules()
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PURE_IMPORTS, str(vendor), *modules],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "sdbridge.wire.client" in modules and "sdbridge.editor.canvas" in modules


@pytest.mark.parametrize("target", sorted(install.TARGETS))
def test_vendor_imports_without_torch_numpy_pil_or_zmq(tmp_path, target):
    folder = Path(install.install(target, plugins_dir=tmp_path, enable=False)[0].split()[-1])
    assert_vendor_imports_alone(folder / install.VENDOR)


def _files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _pip(*args: str | Path) -> None:
    # Nothing from an index: the build and the install use only what this machine has.
    subprocess.run(
        [sys.executable, "-m", "pip", "-q", *map(str, args), "--no-index", "--no-deps"],
        check=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_installs_both_plugins(tmp_path):
    """sdist -> wheel -> `pip install --target`, then the installed `sdbridge` command, run
    outside the checkout: the plugin sources must come from the wheel's package data."""
    # A copy of what a clone has (plus new files), so the build writes nothing into the checkout
    # and sees no stale build/ folder of its own.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    src = tmp_path / "src"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file may be deleted in the working tree
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    # The sdist first, so that MANIFEST.in is checked too: the wheel is built from it.
    build_sdist = (
        "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", build_sdist, dist], cwd=src, check=True, timeout=300)
    (sdist,) = dist.glob("sdbridge-*.tar.gz")
    _pip("wheel", "--no-build-isolation", sdist, "-w", dist)
    (wheel,) = dist.glob("sdbridge-*.whl")
    site = tmp_path / "site"
    _pip("install", "--target", site, wheel)

    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    code = "from sdbridge import install; print(install.__file__); print(install.PLUGINS_ROOT)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    module, plugins_root = out.stdout.splitlines()
    assert Path(module).is_relative_to(site), module  # not the editable checkout
    assert Path(plugins_root) == site / "sdbridge" / "plugins"
    plugins = tmp_path / "plugins"
    for target in install.TARGETS:
        command = [site / "bin" / "sdbridge", "install", target, "--plugins-dir", plugins]
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)

    package = Path(sdbridge.__file__).parent
    for target in install.TARGETS.values():
        folder = plugins / target.folder
        vendor = folder / install.VENDOR
        assert {f for f in _files(folder) if not f.startswith("vendor/")} == _files(target.source)
        for layer in install.PURE_PACKAGES:
            assert _files(vendor / "sdbridge" / layer) == _files(package / layer), layer
        assert (vendor / "msgpack" / "fallback.py").is_file()
        for name in target.extra_files:
            assert (plugins / name).read_bytes() == (target.source.parent / name).read_bytes()
        if target.executable:
            assert os.access(folder / target.executable, os.X_OK)
        assert_vendor_imports_alone(vendor)
    assert "enable_sdbridge_krita=true" in (tmp_path / "config" / "kritarc").read_text()


def test_package_is_a_zip_that_krita_can_import(tmp_path):
    assert cli.main(["package", "krita", "-o", str(tmp_path)]) == 0
    (archive,) = tmp_path.glob("sdbridge_krita-*.zip")
    names = zipfile.ZipFile(archive).namelist()
    assert "sdbridge_krita.desktop" in names and "sdbridge_krita/" in names
    assert "sdbridge_krita/vendor/sdbridge/wire/client.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".so")]
    if not KRITA_IMPORTER.is_file():
        pytest.skip("Krita is not installed: its plugin importer cannot be tried")
    # Krita's own "Import Python Plugin from File" logic, run as the script it also is.
    resources = tmp_path / "resources"
    resources.mkdir()
    out = subprocess.run(
        ["python3", str(KRITA_IMPORTER), str(archive), str(resources)],
        capture_output=True,
        text=True,
    )
    assert "Imported plugin: sdbridge" in out.stdout, out.stderr
    assert (resources / "pykrita" / "sdbridge_krita" / "vendor" / "msgpack" / "ext.py").is_file()


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="krita"):
        install.install("photoshop")
