"""The thin layer between Krita's document API and sdbridge.editor.canvas: everything that touches a
Krita `Document` lives here, so the rest of the plugin deals in Bounds and RGBA bytes."""

from __future__ import annotations

from dataclasses import dataclass

from krita import Krita

from sdbridge.editor import canvas
from sdbridge.editor.canvas import Bounds, Extent, JobPlan, Placement

PREVIEW_LAYER = "sdbridge preview"


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

    def capture(self, strength: float) -> Capture:
        """Reads what a job needs: its region, the mask and, when the job needs them, the
        merged pixels of that region. The mask is the selection; without one, the canvas's
        transparent parts (expand), if it has any."""
        if (self._doc.colorModel(), self._doc.colorDepth()) != ("RGBA", "U8"):
            raise DocumentError(
                "sdbridge works on 8-bit RGB images; convert this one with "
                "Image > Convert Image Color Space (RGB/Alpha, 8-bit integer)."
            )
        selection = self._doc.selection()
        if selection is None or selection.width() <= 0 or selection.height() <= 0:
            return self._capture_canvas(strength)
        bounds = Bounds(selection.x(), selection.y(), selection.width(), selection.height())
        mask = bytes(selection.pixelData(bounds.x, bounds.y, bounds.width, bounds.height))
        try:
            plan = canvas.plan_job(self.extent, bounds, mask)
        except canvas.SelectionOutsideCanvas as exc:
            raise DocumentError("The selection is outside the image.") from exc
        rgba = self._pixels(plan.bounds) if plan.needs_canvas(strength) else None
        return Capture(plan, rgba)

    def _capture_canvas(self, strength: float) -> Capture:
        whole = Bounds.of(self.extent)
        rgba = self._pixels(whole)
        expand = canvas.plan_expand(self.extent, rgba[3::4])
        if expand is None:
            plan = canvas.plan_job(self.extent, None)
            return Capture(plan, rgba if plan.needs_canvas(strength) else None)
        region = canvas.copy_region(rgba, whole, expand.bounds, 4)
        return Capture(expand, bytes(canvas.fill_transparent(region, expand.bounds.extent)))

    def _pixels(self, b: Bounds) -> bytes:
        """The merged image (what the artist sees) over `b`, as RGBA."""
        return bytes(canvas.bgra_to_rgba(self._doc.pixelData(b.x, b.y, b.width, b.height)))

    def add_layer(self, placement: Placement, name: str) -> None:
        """A paint layer on top of the stack. The node is filled before it joins the image,
        so adding it is one undo step."""
        self.clear_preview()
        self._doc.rootNode().addChildNode(self._layer(placement, name), None)
        self._doc.refreshProjection()

    def show_preview(self, placement: Placement) -> None:
        """A history image shown on the canvas, on a layer of its own above the others, until
        it is applied or another is shown."""
        self.clear_preview()
        self._doc.rootNode().addChildNode(self._layer(placement, PREVIEW_LAYER), None)
        self._doc.refreshProjection()

    def clear_preview(self) -> None:
        for node in self._doc.rootNode().childNodes():
            if node.name() == PREVIEW_LAYER:
                node.remove()

    def _layer(self, placement: Placement, name: str):
        node = self._doc.createNode(name, "paintlayer")
        b = placement.bounds
        node.setPixelData(bytes(canvas.rgba_to_bgra(placement.rgba)), b.x, b.y, b.width, b.height)
        return node
