"""9. Live mode's latency in the real Krita: from a stroke to the live layer showing that stroke's
image, through the docker, the daemon (the embedded model) and back.

A stroke is a square painted on the background layer (`setPixelData`, then the projection made
again, as a brush's stroke ends); the strokes are spaced so that each one's job can finish. All
times are taken inside Krita: the stroke, the live job going out (the docker saw the change, it
held still for the debounce, the canvas was read), and the live layer updated with that job's
image. The daemon runs once as it is and once told to use AVX2 at most
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`), the target machine's instruction set.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    CACHE,
    PROMPT,
    model_label,
    parser,
    report,
    set_threads,
    start_daemon,
    table,
)
from sdbridge import tiny

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SIZES = [(128, 128), (512, 384)]  # the embedded model's native size; a sketch's canvas
TARGET_MS = 400.0
# Inside Krita: the times (time.perf_counter) of each stroke, each live job sent, each image
# shown on the live layer, recorded by wrapping the docker's own calls.
PROBE = """
import time
times = state['times'] = {'stroke': [], 'sent': [], 'shown': []}
connection = dock().model._connection
def submit(fields, on_view, real=type(connection).submit.__get__(connection)):
    times['sent'].append(time.perf_counter())
    return real(fields, on_view)
connection.submit = submit
document = dock().model.live.document
def show_live(placement, real=type(document).show_live.__get__(document)):
    real(placement)
    times['shown'].append(time.perf_counter())
document.show_live = show_live
def stroke(index, side):
    doc = state['doc']
    x, y = (index * 37) % (doc.width() - side), (index * 23) % (doc.height() - side)
    colour = bytes([(index * 67) % 256, (index * 131) % 256, 200, 255])
    times['stroke'].append(time.perf_counter())
    doc.rootNode().childNodes()[0].setPixelData(colour * side * side, x, y, side, side)
    doc.refreshProjection()
state['stroke'] = stroke
"""


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment (for the daemons it starts), then as before."""
    before = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(krita, width: int, height: int, strokes: int) -> dict[str, list[float]]:
    """Live mode on a fresh canvas: `strokes` strokes, each waited for; seconds per stroke."""
    krita.run(f"close_documents(); new_document({width}, {height}, [200, 160, 120, 255])")
    krita.run(f"dock().prompt.setPlainText({PROMPT!r}); dock().live.setChecked(True)")
    try:
        krita.wait_for("dock().model.live.image is not None", timeout=60)  # the canvas as found
        krita.run(PROBE)
        side = max(8, width // 8)
        for index in range(1, strokes + 2):  # the first stroke warms up
            shown = krita.eval("len(state['times']['shown'])")
            krita.run(f"stroke({index}, {side})")
            krita.wait_for(f"len(state['times']['shown']) > {shown}", timeout=60)
        times = krita.eval("state['times']")
    finally:
        krita.run("dock().live.setChecked(False); del dock().model._connection.submit")
    rows = {"total": [], "to_sent": [], "sent_to_shown": []}
    # The first stroke warmed up; each stroke sent one job and showed its image.
    for stroke, sent, shown in zip(times["stroke"], times["sent"], times["shown"], strict=True):
        assert stroke <= sent <= shown, "each stroke's own job and image, in order"
        if stroke == times["stroke"][0]:
            continue
        rows["total"].append(shown - stroke)
        rows["to_sent"].append(sent - stroke)
        rows["sent_to_shown"].append(shown - sent)
    return rows


def main() -> int:
    p = parser(__doc__.splitlines()[0], repeats=20)
    p.add_argument("--model", type=Path, default=tiny.MODEL_DIR, help="default: the embedded one")
    args = p.parse_args()
    if args.quick:
        args.repeats = 3
    from krita.conftest import krita_missing, plugin_profile, start_krita  # tests/krita

    missing = krita_missing()
    if missing:
        print(f"live_latency: skipped ({missing})")
        return 0
    set_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="live-latency-"))
    profile = plugin_profile(work / "profile", work / "template.log")
    krita = None
    rows, medians = [], {}
    try:
        for isa, env in (("as is", {}), ("AVX2", AVX2)):
            with environment(env):
                daemon = start_daemon(args.model, CACHE / "live-latency")
            try:
                if krita is None:
                    krita = start_krita(profile, daemon.address)
                krita.connect(daemon.address)
                krita.wait_for("dock().live.isEnabled()", timeout=30)
                for width, height in SIZES:
                    times = measure(krita, width, height, args.repeats)
                    total = times["total"]
                    medians[(isa, width)] = statistics.median(total)
                    rows.append(
                        [
                            f"{width}x{height}",
                            isa,
                            f"{statistics.median(total) * 1e3:.0f}",
                            f"{percentile(total, 0.9) * 1e3:.0f}",
                            f"{statistics.median(times['to_sent']) * 1e3:.0f}",
                            f"{statistics.median(times['sent_to_shown']) * 1e3:.0f}",
                        ]
                    )
            finally:
                daemon.stop()
    finally:
        if krita is not None:
            krita.quit()
    print(
        f"model {model_label(args.model)}, {args.repeats} strokes per row, {args.threads} "
        "thread(s) in the daemon; ms from the stroke to its image on the live layer"
    )
    table(["canvas", "daemon ISA", "median", "p90", "to sent", "sent to shown"], rows)
    worst = max(medians[("AVX2", 128)], medians[("as is", 128)])
    print(f"target: median <= {TARGET_MS:.0f} ms at 128x128 on AVX2")
    report("live_latency_128_median_ms", worst * 1e3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
