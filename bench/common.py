"""What every benchmark shares: threads, statistics, tables, the model and a daemon to talk to.

This machine is shared and noisy, so every benchmark measures its sides interleaved in one run
and reports medians of paired ratios with their spread, never an absolute time alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy, and needed only by the benchmarks that run models
    import torch
    from conftest import DaemonProcess
    from diffusers import DiffusionPipeline

REPO = Path(__file__).resolve().parent.parent
# The daemon launcher and the SD-shaped model builder live with the tests; reuse them as they are.
sys.path.insert(0, str(REPO / "tests"))
CACHE = Path(tempfile.gettempdir()) / "sdbridge-bench"
PROMPT = "a red circle on a blue background"


def parser(description: str, repeats: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, the same on every side (1: two OpenMP threads stall at every "
        "barrier on a busy 2-core machine)",
    )
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs per side")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    return p


def model_parser(description: str, repeats: int, steps: int | None = 20) -> argparse.ArgumentParser:
    """`parser` plus the model to run: --model, --native (the test model's size), --steps."""
    p = parser(description, repeats)
    p.add_argument("--model", type=Path, help="default: the embedded model, else a test model")
    p.add_argument("--native", type=int, default=128, help="native size of the test model")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    return p


def quiet() -> None:
    """No progress bars or library chatter between the tables."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def set_threads(threads: int) -> None:
    """Pin torch's threads here and in every process started from here (daemons, scripts)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


@dataclass(frozen=True)
class Stats:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples))

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats were."""
        return (self.high - self.low) / abs(self.median) if self.median else 0.0

    def show(self, scale: float = 1.0, digits: int = 1) -> str:
        m, lo, hi = self.median * scale, self.low * scale, self.high * scale
        return f"{m:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        padded = (
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(padded))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def report(name: str, value: float) -> None:
    """The benchmark's last line, which `python -m bench` collects."""
    print(f"{name}: {value:.3f}", flush=True)


def default_model(native: int) -> Path:
    """The embedded tiny model if it has been trained, else an SD-shaped random test model.

    The test model's UNet is resized to ``native`` px only through its config's `sample_size`
    (what the engine reads as the native size): the weights stay the same.
    """
    from sdbridge import tiny

    if tiny.is_present():
        return tiny.MODEL_DIR
    folder = CACHE / f"test-model-{native}"
    if not (folder / "model_index.json").is_file():
        from pipelines import build_pipeline

        build_pipeline(folder)
        config_path = folder / "unet" / "config.json"
        config = json.loads(config_path.read_text())
        config["sample_size"] = native // 8
        config_path.write_text(json.dumps(config, indent=2))
    return folder


def model_label(model: Path) -> str:
    """The name the daemon lists a model folder under: the embedded model's, else the folder's."""
    from sdbridge import tiny

    return tiny.NAME if model.resolve() == tiny.MODEL_DIR else model.name


def load_direct(model: Path, dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """The model as a script would load it (fp32 unless told), without a progress bar."""
    import torch
    from diffusers import AutoPipelineForText2Image

    quiet()
    pipe = AutoPipelineForText2Image.from_pretrained(model, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_daemon(model: Path, workdir: Path, *extra: str) -> DaemonProcess:
    """`sdbridge serve` in a subprocess with this process's thread settings (its environment)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import DaemonProcess

    workdir.mkdir(parents=True, exist_ok=True)
    return DaemonProcess(model, workdir, *extra).start()
