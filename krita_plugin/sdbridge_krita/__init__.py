"""sdbridge for Krita: a docker that generates images with a local sdbridge daemon.

`sdbridge install krita` puts the pure sdbridge modules and a pure-Python msgpack into
`vendor/`; it goes first on sys.path so the plugin runs the client it was installed with.
"""

import os
import sys

_VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")
if os.path.isdir(_VENDOR) and _VENDOR not in sys.path:
    sys.path.insert(0, _VENDOR)

from krita import DockWidgetFactory, DockWidgetFactoryBase, Krita  # noqa: E402

from .docker import DOCKER_ID, SdbridgeDocker  # noqa: E402

Krita.instance().addDockWidgetFactory(
    DockWidgetFactory(DOCKER_ID, DockWidgetFactoryBase.DockRight, SdbridgeDocker)
)
