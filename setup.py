"""pyproject.toml holds the metadata; this file adds one build step: the editor plugins live at
the repository's top (beside their tests and docs, outside the package), so the wheel gets a
copy of them as `sdbridge/plugins/` for `sdbridge install` to use once installed."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# Copied whole under their own names: install.py reads `sdbridge/plugins/<folder>/...`.
PLUGIN_FOLDERS = ("krita_plugin", "gimp_plugin")


class BuildPyWithPlugins(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads the plugins from the checkout itself
        for folder in PLUGIN_FOLDERS:
            dest = Path(self.build_lib, "sdbridge", "plugins", folder)
            shutil.rmtree(dest, ignore_errors=True)  # a file deleted since the last build goes
            shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithPlugins})
