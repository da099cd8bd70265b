"""The thin layer between Krita's document API and sdbridge.editor.canvas: everything that touches a
Krita `Document` lives here, so the rest of the plugin deals in Bounds and RGBA bytes."""

from __future__ import annotations

from dataclasses import dataclass

from krita import Krita

from sdbridge.editor import canvas
from sdbridge.editor.canvas import Bounds, Extent, JobPlan, Placement


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

    def add_layers(self, placements: list[Placement], names: list[str], group: str) -> None:
        """One paint layer per image on top of the stack; several go into one group. The nodes
        are filled before they join the image, so adding them is one undo step."""
        layers = []
        for placement, name in zip(placements, names, strict=True):
            node = self._doc.createNode(name, "paintlayer")
            b = placement.bounds
            node.setPixelData(
                bytes(canvas.rgba_to_bgra(placement.rgba)), b.x, b.y, b.width, b.height
            )
            layers.append(node)
        top = layers[0]
        if len(layers) > 1:
            top = self._doc.createGroupLayer(group)
            for node in layers:
                top.addChildNode(node, None)
        self._doc.rootNode().addChildNode(top, None)
        self._doc.refreshProjection()
