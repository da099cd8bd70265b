"""Fixtures for the tests that run inside the real GIMP 3 (marker `gimp`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gimp_runner import Gimp, chroot_missing  # noqa: E402


@pytest.fixture(scope="session")
def gimp() -> Iterator[Gimp]:
    """One profile with the plug-in installed, shared by the session's GIMP runs (a profile
    copy costs a second; the first run registers the plug-in, later ones reuse that)."""
    reason = chroot_missing()
    if reason:
        pytest.skip(reason)
    instance = Gimp()
    yield instance
    instance.remove()
