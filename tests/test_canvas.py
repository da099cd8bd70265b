"""The editor rules both plugins rely on: job region, pixels, masks, placement."""

import sys
from collections.abc import Callable
from types import FrameType

import pytest
from helpers import solid_image

from sdbridge.editor.canvas import (
    Bounds,
    Extent,
    JobPlan,
    SelectionOutsideCanvas,
    bgra_to_rgba,
    copy_region,
    fill_transparent,
    job_bounds,
    layer_name,
    place_result,
    plan_area,
    plan_expand,
    plan_job,
    rgba_to_bgra,
)

CANVAS = Extent(400, 300)


def solid(extent: Extent, rgba: tuple[int, int, int, int]) -> bytes:
    return bytes(rgba) * extent.pixel_count


def pixel(buf: bytes | bytearray, extent: Extent, x: int, y: int, bpp: int = 4) -> tuple:
    i = (y * extent.width + x) * bpp
    return tuple(buf[i : i + bpp])


def test_no_selection_covers_the_whole_canvas():
    assert job_bounds(CANVAS, None) == Bounds(0, 0, 400, 300)


def test_selection_gets_context_around_it_and_stays_inside_the_canvas():
    sel = Bounds(100, 100, 80, 40)
    job = job_bounds(CANVAS, sel)
    assert job.contains(sel)
    assert job.x < sel.x and job.y < sel.y and job.right > sel.right and job.bottom > sel.bottom
    # near the corner the context is cut at the canvas edge
    corner = job_bounds(CANVAS, Bounds(380, 0, 20, 20))
    assert corner.x < 380 and (corner.right, corner.y) == (400, 0)
    assert Bounds.of(CANVAS).contains(corner)


def test_selection_partly_outside_is_clamped_and_fully_outside_is_refused():
    job = job_bounds(CANVAS, Bounds(-50, -50, 100, 100))
    assert (job.x, job.y) == (0, 0) and Bounds.of(CANVAS).contains(job)
    with pytest.raises(SelectionOutsideCanvas):
        job_bounds(CANVAS, Bounds(500, 10, 20, 20))


def test_gimp_corner_bounds():
    assert Bounds.from_corners(10, 20, 30, 60) == Bounds(10, 20, 20, 40)


def test_bgra_and_rgba_swap_red_and_blue_only():
    bgra = bytes([1, 2, 3, 4, 10, 20, 30, 40])
    assert bytes(bgra_to_rgba(bgra)) == bytes([3, 2, 1, 4, 30, 20, 10, 40])
    assert bytes(rgba_to_bgra(bgra_to_rgba(bgra))) == bgra


def _python_lines(work: Callable[[], object]) -> int:
    """How many lines of Python `work` runs (work done in C, such as slicing, runs none)."""
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable:
        nonlocal lines
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        work()
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize("convert", [bgra_to_rgba, rgba_to_bgra])
def test_pixel_conversion_of_a_large_canvas_runs_no_python_per_pixel(convert: Callable) -> None:
    # A 4-megapixel canvas must convert without stalling the editor: as little Python as 1 pixel.
    big = bytes(range(256)) * (2048 * 2048 * 4 // 256)
    assert _python_lines(lambda: convert(big)) == _python_lines(lambda: convert(bytes(4)))
    assert convert(big)[0:4] == bytes([2, 1, 0, 3])


def test_copy_region_crops_and_fills_outside_with_zero():
    src = Bounds(10, 10, 4, 2)
    data = bytes(range(8))  # one byte per pixel
    out = copy_region(data, src, Bounds(12, 9, 4, 4), 1)
    assert bytes(out) == bytes([0, 0, 0, 0, 2, 3, 0, 0, 6, 7, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        copy_region(data[:-1], src, src, 1)


def test_a_soft_selection_mask_keeps_its_values():
    sel = Bounds(50, 50, 2, 1)
    plan = plan_job(CANVAS, sel, bytes([128, 255]))
    x, y = sel.x - plan.bounds.x, sel.y - plan.bounds.y
    assert pixel(plan.mask, plan.bounds.extent, x, y, 1) == (128,)
    assert pixel(plan.mask, plan.bounds.extent, x + 1, y, 1) == (255,)


def test_result_lands_on_the_selection_and_only_selected_pixels_are_opaque():
    sel = Bounds(100, 100, 40, 20)
    plan = plan_job(CANVAS, sel)
    result = _raw(plan.bounds.extent, (200, 0, 0, 255))
    placed = place_result(result, plan)
    assert placed.bounds == sel
    assert len(placed.rgba) == sel.width * sel.height * 4
    assert set(placed.rgba[3::4]) == {255} and set(placed.rgba[0::4]) == {200}


def test_feathered_selection_makes_a_soft_edge_and_unselected_pixels_transparent():
    sel = Bounds(0, 0, 3, 1)
    plan = plan_job(Extent(3, 1), sel, bytes([0, 128, 255]))
    placed = place_result(_raw(plan.bounds.extent, (1, 2, 3, 255)), plan)
    assert bytes(placed.rgba) == bytes([1, 2, 3, 0, 1, 2, 3, 128, 1, 2, 3, 255])


def test_result_without_selection_covers_the_canvas_unchanged():
    plan = plan_job(CANVAS, None)
    data = bytes(range(256)) * (CANVAS.pixel_count * 4 // 256)
    placed = place_result({**_raw(CANVAS, (0, 0, 0, 0)), "data": data}, plan)
    assert placed.bounds == Bounds.of(CANVAS) and bytes(placed.rgba) == data


def test_area_plan_paints_exactly_the_selection_bounds_without_mask_or_padding():
    plan = plan_area(CANVAS, Bounds(380, -10, 40, 30))
    assert plan.bounds == plan.target == Bounds(380, 0, 20, 20) and plan.mask is None
    placed = place_result(_raw(plan.bounds.extent, (9, 8, 7, 255)), plan)
    assert placed.bounds == Bounds(380, 0, 20, 20) and set(placed.rgba[3::4]) == {255}
    assert plan_area(CANVAS, None).bounds == Bounds.of(CANVAS)
    with pytest.raises(SelectionOutsideCanvas):
        plan_area(CANVAS, Bounds(500, 0, 10, 10))


def test_result_of_the_wrong_size_or_format_is_refused():
    plan = JobPlan(Bounds(0, 0, 4, 4), Bounds(0, 0, 4, 4), None)
    with pytest.raises(ValueError, match="4x4"):
        place_result(_raw(Extent(8, 8), (0, 0, 0, 255)), plan)
    with pytest.raises(ValueError, match="raw"):
        place_result({**_raw(Extent(4, 4), (0, 0, 0, 255)), "format": "png"}, plan)


def test_layer_name_has_prompt_and_seed_on_one_short_line():
    assert layer_name("a red\n  circle", 42) == "a red circle (42)"
    long = layer_name("word " * 40, 7)
    assert long.endswith("… (7)") and len(long) <= 40 + len(" (7)")
    assert layer_name("   ", 1) == "sdbridge (1)"


def _raw(extent: Extent, rgba: tuple[int, int, int, int]) -> dict:
    return solid_image(extent.width, extent.height, rgba)


def test_area_plan_cuts_the_new_picture_to_a_shaped_or_feathered_selection():
    """GIMP's Generate paints the selection's bounds afresh; only the selected pixels show."""
    selection = Bounds(10, 10, 3, 1)
    plan = plan_area(CANVAS, selection, bytes([0, 128, 255]))
    assert plan.mask == bytes([0, 128, 255]) and not plan.inpaints
    assert not plan.needs_canvas(1.0) and plan.needs_canvas(0.5)
    placed = place_result(_raw(plan.bounds.extent, (1, 2, 3, 255)), plan)
    assert placed.bounds == selection
    assert bytes(placed.rgba) == bytes([1, 2, 3, 0, 1, 2, 3, 128, 1, 2, 3, 255])
    # A rectangular selection (all 255) needs no cut: the layer is opaque.
    assert plan_area(CANVAS, selection, b"\xff" * 3).mask is None


def test_expand_masks_the_transparent_margin_and_keeps_the_picture():
    """After Image > Canvas Size the new margin is transparent: it is what the job paints."""
    canvas = Extent(8, 4)
    alpha = bytearray(b"\xff" * 32)
    for y in range(4):
        alpha[y * 8 + 6 : y * 8 + 8] = b"\x00\x00"  # two transparent columns on the right
    alpha[5] = 128  # one half-transparent pixel: half repainted
    plan = plan_expand(canvas, bytes(alpha))
    assert plan is not None and plan.inpaints
    assert plan.target == Bounds(5, 0, 3, 4)  # the transparent part
    assert plan.bounds == Bounds(0, 0, 8, 4)  # with context around it, within the canvas
    row0 = plan.mask[0:8]
    assert row0 == bytes([0, 0, 0, 0, 0, 127, 255, 255])
    assert plan_expand(canvas, b"\xff" * 32) is None  # nothing transparent
    assert plan_expand(canvas, b"\x00" * 32) is None  # nothing to extend: a plain job


def test_expands_init_image_stretches_the_picture_into_the_margin():
    extent = Extent(4, 3)
    blue, red = bytes([0, 0, 255, 255]), bytes([255, 0, 0, 255])
    clear = bytes(4)
    rgba = (clear + blue + red + clear) + (clear * 4) + (blue + red + clear + clear)
    filled = fill_transparent(rgba, extent)
    rows = [bytes(filled[y * 16 : (y + 1) * 16]) for y in range(3)]
    assert rows[0] == blue + blue + red + red
    assert rows[1] in (rows[0], rows[2])  # an empty row copies the nearest painted one
    assert rows[2] == blue + red + red + red
    assert set(filled[3::4]) == {255}
