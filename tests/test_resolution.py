"""Generation sizes per family, exact sizes on request, and the second pass for large targets."""

from __future__ import annotations

import pytest
from helpers import Peer, pixels

from sdbridge import tiny
from sdbridge.daemon.resolution import refine_size, size_range

# The library daemon serves several models: these tests are about the 64 px test model.
JOB = {
    "prompt": "a red circle on a blue background",
    "num_inference_steps": 4,
    "seed": 42,
    "model": "tiny-sd",
}


@pytest.mark.parametrize(
    ("family", "native", "low", "high", "multiple"),
    [
        ("sd1", 512, 512, 768, 8),
        ("sd1", 128, 128, 192, 8),  # an SD 1.x model at 128 px that declares nothing
        ("sd2", 768, 768, 960, 8),
        ("sdxl", 1024, 768, 1280, 64),
        ("flux", 1024, 768, 1280, 16),
    ],
)
def test_each_family_has_its_range(family, native, low, high, multiple) -> None:
    sizes = size_range(family, native)
    assert (sizes.low, sizes.high, sizes.multiple) == (low, high, multiple)
    for target in [(96, 96), (4000, 3000), (300, 1200), (low + 40, low + 40)]:
        width, height = sizes.fit(*target)
        assert width % multiple == 0 and height % multiple == 0
        # Inside the range by area, give or take the rounding to the multiple.
        assert (low - multiple) ** 2 <= width * height <= (high + multiple) ** 2
        assert width / height == pytest.approx(target[0] / target[1], rel=0.15)


def test_a_small_selection_grows_to_native_and_a_huge_canvas_shrinks() -> None:
    sd15 = size_range("sd1", 512)
    assert sd15.fit(96, 96) == (512, 512)
    assert sd15.fit(4000, 3000) == (888, 664)
    assert sd15.fit(640, 512) == (640, 512)  # inside the range: as asked


def test_the_embedded_model_paints_each_canvas_at_its_own_area_and_aspect() -> None:
    """It was trained on aspect buckets at about 128x128's area and says so in its folder, so
    an ordinary canvas is not painted at 1.5x that area, where it duplicated objects."""
    sizes = size_range("sd1", 128, str(tiny.MODEL_DIR))
    assert (sizes.low, sizes.high) == (128, 128)
    assert sizes.fit(512, 384) == (144, 112)
    assert sizes.fit(384, 512) == (112, 144)
    assert sizes.fit(640, 360) == (168, 96)
    assert sizes.fit(1024, 1024) == sizes.fit(64, 64) == (128, 128)


@pytest.mark.parametrize(
    "declared",
    [
        "{not json",
        '{"sizes": [128, 128, 8]}',
        '{"sizes": {"low": 128, "high": 64, "multiple": 8}}',
        '{"sizes": {"low": 128, "high": 128}}',
        '{"sizes": {"low": "big", "high": 128, "multiple": 8}}',
        '{"sizes": {"low": 128, "high": 128, "multiple": 0}}',
    ],
)
def test_a_folder_that_declares_its_sizes_badly_gets_its_familys_range(
    tmp_path, declared: str
) -> None:
    (tmp_path / "sdbridge.json").write_text(declared)
    assert size_range("sd1", 512, str(tmp_path)) == size_range("sd1", 512)


def test_a_folder_may_declare_the_sizes_its_training_covered(tmp_path) -> None:
    (tmp_path / "sdbridge.json").write_text('{"sizes": {"low": 256, "high": 320, "multiple": 16}}')
    sizes = size_range("sd1", 256, str(tmp_path))
    assert (sizes.low, sizes.high, sizes.multiple) == (256, 320, 16)
    assert sizes.fit(1000, 1000) == (320, 320)


def test_the_second_pass_doubles_at_most_and_only_for_larger_targets() -> None:
    sd15 = size_range("sd1", 512)
    assert refine_size((888, 664), (4000, 3000), sd15) == (1776, 1328)
    assert refine_size((512, 512), (700, 700), sd15) == (704, 704)
    assert refine_size((512, 512), (600, 600), sd15) is None  # scaling 1.17x is enough
    assert refine_size((640, 512), (640, 512), sd15) is None
    assert refine_size((512, 512), (300, 300), sd15) is None


def preview_sizes(events: list[dict]) -> list[tuple[int, int]]:
    return [(e["image"]["width"], e["image"]["height"]) for e in events if e["event"] == "preview"]


def test_exact_size_generates_at_the_asked_size_instead_of_native(library_peer: Peer) -> None:
    """The test model is native at 64 px; previews show the latent (1/8 of the generation)."""
    native = library_peer.generate(**JOB, width=32, height=32, preview_every=4)
    exact = library_peer.generate(**JOB, width=32, height=32, preview_every=4, exact_size=True)
    assert preview_sizes(native) == [(8, 8)]
    assert preview_sizes(exact) == [(4, 4)]
    for events in (native, exact):
        assert (events[-1]["images"][0]["width"], events[-1]["images"][0]["height"]) == (32, 32)


def test_a_second_pass_refines_a_large_target_and_counts_in_the_progress(
    library_peer: Peer,
) -> None:
    plain = library_peer.generate(**JOB, width=192, height=192)
    refined = library_peer.generate(
        **JOB, width=192, height=192, refine_strength=0.5, preview_every=1
    )
    steps = [(e["step"], e["total"]) for e in refined if e["event"] == "progress"]
    assert steps == [(step, 6) for step in range(1, 7)]  # 4 steps, then 4 x 0.5 at 192 px
    sizes = preview_sizes(refined)
    assert sizes[0] == (12, 12) and sizes[-1] == (24, 24)  # 96 px, then 192 px
    assert "Denoising strength: 0.5, Hires upscale: 2" in refined[-1]["parameters"]
    assert "Hires" not in plain[-1]["parameters"]
    image, base = pixels(refined[-1]["images"][0]), pixels(plain[-1]["images"][0])
    assert image.shape == base.shape == (192, 192, 4)
    assert abs(image.astype(int) - base.astype(int)).mean() > 1.0
