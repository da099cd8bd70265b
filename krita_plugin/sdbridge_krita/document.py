"""The thin layer between Krita's document API and sdbridge.editor.canvas: everything that touches a
Krita `Document` lives here, so the rest of the plugin deals in Bounds and RGBA bytes."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from krita import Krita
from PyQt5.QtCore import QTimer

from sdbridge.editor import canvas
from sdbridge.editor.canvas import Bounds, Extent, JobPlan, Placement
from sdbridge.editor.live import LayerState, selection_state

PREVIEW_LAYER = "sdbridge preview"  # a history image being looked at
LIVE_LAYER = "sdbridge live"  # live mode's newest image
# sdbridge's own layers show what it made: they are never part of a job's input.
OWN_LAYERS = (PREVIEW_LAYER, LIVE_LAYER)


class DocumentError(Exception):
    """Something about the document stops a job; the message is for the artist."""


@dataclass(frozen=True)
class Capture:
    plan: JobPlan
    rgba: bytes | None  # the merged image over plan.bounds, when the job needs it


class KritaDocument:
    def __init__(self, doc) -> None:
        self._doc = doc

    @staticmethod
    def active() -> KritaDocument:
        doc = Krita.instance().activeDocument()
        if doc is None:
            raise DocumentError("Open or create an image first.")
        return KritaDocument(doc)

    @property
    def is_open(self) -> bool:
        # Krita hands out a new wrapper per call: compare with ==, which compares the documents.
        return any(d == self._doc for d in Krita.instance().documents())

    @property
    def extent(self) -> Extent:
        return Extent(self._doc.width(), self._doc.height())

    def check_rgba8(self) -> None:
        """sdbridge's pixels are 8-bit RGBA: a layer of them in another colour space would be
        read as something else (and past its end)."""
        if (self._doc.colorModel(), self._doc.colorDepth()) != ("RGBA", "U8"):
            raise DocumentError(
                "sdbridge works on 8-bit RGB images; convert this one with "
                "Image > Convert Image Color Space (RGB/Alpha, 8-bit integer)."
            )

    def capture(self, strength: float, controls: Collection[str] = ()) -> Capture:
        """Reads what a job needs: its region, the mask and, when the job needs them, the
        merged pixels of that region. The mask is the selection; without one, the canvas's
        transparent parts (expand), if it has any. The `controls` layers (by id) steer the job:
        they are no part of the picture it starts from."""
        self.check_rgba8()
        selection = self._doc.selection()
        if selection is None or selection.width() <= 0 or selection.height() <= 0:
            return self._capture_canvas(strength, controls)
        bounds = Bounds(selection.x(), selection.y(), selection.width(), selection.height())
        mask = bytes(selection.pixelData(bounds.x, bounds.y, bounds.width, bounds.height))
        try:
            plan = canvas.plan_job(self.extent, bounds, mask)
        except canvas.SelectionOutsideCanvas as exc:
            raise DocumentError("The selection is outside the image.") from exc
        rgba = self._pixels(plan.bounds, controls) if plan.needs_canvas(strength) else None
        return Capture(plan, rgba)

    def _capture_canvas(self, strength: float, controls: Collection[str]) -> Capture:
        whole = Bounds.of(self.extent)
        rgba = self._pixels(whole, controls)
        expand = canvas.plan_expand(self.extent, rgba[3::4])
        if expand is None:
            plan = canvas.plan_job(self.extent, None)
            return Capture(plan, rgba if plan.needs_canvas(strength) else None)
        region = canvas.copy_region(rgba, whole, expand.bounds, 4)
        return Capture(expand, bytes(canvas.fill_transparent(region, expand.bounds.extent)))

    def _pixels(self, b: Bounds, controls: Collection[str] = ()) -> bytes:
        """The artist's merged image (what they see, without sdbridge's layers and the control
        layers) over `b`, as RGBA."""
        hidden = self._own_nodes() + [n for n in self._nodes() if self._id(n) in controls]
        with self._hidden(hidden):
            bgra = self._doc.pixelData(b.x, b.y, b.width, b.height)
        return bytes(canvas.bgra_to_rgba(bgra))

    @contextmanager
    def _hidden(self, nodes: list) -> Iterator[None]:
        """The projection without these layers, made again at once (Krita updates it in the
        background otherwise): hiding a layer is no undo step."""
        shown = [node for node in nodes if node.visible()]
        for node in shown:
            node.setVisible(False)
        if shown:
            self._refresh()
        try:
            yield
        finally:
            for node in shown:
                node.setVisible(True)
            if shown:
                self._refresh()

    def _refresh(self) -> None:
        self._doc.refreshProjection()
        self._doc.waitForDone()

    def _own_nodes(self) -> list:
        return [n for n in self._doc.rootNode().childNodes() if n.name() in OWN_LAYERS]

    def _nodes(self) -> Iterator:
        """Every layer, groups' contents too, top-level ones first."""
        pending = list(self._doc.rootNode().childNodes())
        while pending:
            node = pending.pop(0)
            yield node
            pending.extend(node.childNodes())

    @staticmethod
    def _id(node) -> str:
        return node.uniqueId().toString()

    def layer_names(self) -> dict[str, str]:
        """The artist's layers (groups' too) by id: their names, for the control list."""
        return {
            self._id(n): n.name()
            for n in self._nodes()
            if n.type() != "selectionmask" and n.name() not in OWN_LAYERS
        }

    def active_layer(self) -> str | None:
        """The id of the layer the artist works on, if it is one of theirs."""
        node = self._doc.activeNode()
        if node is None or node.name() in OWN_LAYERS or node.type() == "selectionmask":
            return None
        return self._id(node)

    def add_control_layer(self, name: str) -> str:
        """A transparent paint layer on top (below the live image) to draw a control on; the
        artist's brush goes on it at once. Returns its id."""
        node = self._doc.createNode(name, "paintlayer")
        self._add(node)
        self._doc.setActiveNode(node)
        return self._id(node)

    def control_pixels(self, layer: str, b: Bounds) -> bytes | None:
        """A control layer's own pixels over `b`, as RGBA; None when the image has no such
        layer (deleted, or another image's) or it is hidden (switched off)."""
        node = next((n for n in self._nodes() if self._id(n) == layer), None)
        if node is None or not node.visible():
            return None
        return bytes(canvas.bgra_to_rgba(node.pixelData(b.x, b.y, b.width, b.height)))

    def _own(self, name: str):
        return next((n for n in self._doc.rootNode().childNodes() if n.name() == name), None)

    def layer_states(self) -> tuple[LayerState, ...]:
        """What live mode watches for a change: each of the artist's layers (a group with
        what is in it). Its cost is reading their pixels: the polls space out on a large
        canvas (`live.next_poll_s`)."""
        w, h = self._doc.width(), self._doc.height()
        return tuple(
            LayerState.of(
                node.uniqueId().toString(),
                node.visible(),
                node.opacity(),
                node.blendingMode(),
                bytes(node.pixelData(0, 0, w, h)) if node.visible() else None,
            )
            for node in self._doc.rootNode().childNodes()
            if node.name() not in OWN_LAYERS and node.type() != "selectionmask"
        )

    def selection_state(self) -> int | None:
        selection = self._doc.selection()
        if selection is None or selection.width() <= 0 or selection.height() <= 0:
            return None
        x, y, w, h = selection.x(), selection.y(), selection.width(), selection.height()
        return selection_state(x, y, w, h, bytes(selection.pixelData(x, y, w, h)))

    def add_layer(self, placement: Placement, name: str) -> None:
        """A paint layer on top of the artist's layers (below the live image, which stays in
        view). The node is filled before it joins the image, so adding it is one undo step."""
        self.clear_preview()
        self._add(self._layer(placement, name))
        self._doc.refreshProjection()

    def show_preview(self, placement: Placement) -> None:
        """A history image shown on the canvas, on a layer of its own above the others, until
        it is applied or another is shown."""
        self.clear_preview()
        self._add(self._layer(placement, PREVIEW_LAYER))
        self._doc.refreshProjection()

    def clear_preview(self) -> None:
        preview = self._own(PREVIEW_LAYER)
        if preview is not None:
            preview.remove()

    def _add(self, node) -> None:
        """On top, or just below the live layer (Krita's `above`: the node it goes over)."""
        children = self._doc.rootNode().childNodes()
        names = [child.name() for child in children]
        index = names.index(LIVE_LAYER) if LIVE_LAYER in names else 0
        self._doc.rootNode().addChildNode(node, children[index - 1] if index > 0 else None)

    def start_live(self) -> None:
        """An empty live layer on top, made once when live mode starts: each image then only
        replaces its pixels, which is no undo step, so Ctrl+Z undoes the artist's strokes."""
        if self._own(LIVE_LAYER) is not None:
            return
        active = self._doc.activeNode()
        node = self._doc.createNode(LIVE_LAYER, "paintlayer")
        node.setLocked(True)  # a stroke on it would be lost at the next image
        self._doc.rootNode().addChildNode(node, None)
        if active is not None:
            # The artist goes on painting where they were. Krita makes the new layer the active
            # one from its event loop, after this returns: take it back after that.
            QTimer.singleShot(0, lambda: self._doc.setActiveNode(active))

    def show_live(self, placement: Placement) -> None:
        """Live mode's newest image, in place of the one before."""
        node = self._own(LIVE_LAYER)
        if node is None:  # undone or deleted by the artist
            self.start_live()
            node = self._own(LIVE_LAYER)
        old = node.bounds()
        if old.width() > 0 and old.height() > 0:
            blank = bytes(old.width() * old.height() * 4)
            node.setPixelData(blank, old.x(), old.y(), old.width(), old.height())
        b = placement.bounds
        node.setPixelData(bytes(canvas.rgba_to_bgra(placement.rgba)), b.x, b.y, b.width, b.height)
        self._doc.refreshProjection()

    def stop_live(self) -> None:
        live = self._own(LIVE_LAYER)
        if live is not None:
            live.remove()
            self._doc.refreshProjection()

    def _layer(self, placement: Placement, name: str):
        node = self._doc.createNode(name, "paintlayer")
        b = placement.bounds
        node.setPixelData(bytes(canvas.rgba_to_bgra(placement.rgba)), b.x, b.y, b.width, b.height)
        return node
