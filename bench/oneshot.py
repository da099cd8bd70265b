"""What a user without a daemon runs for each picture: load the model, generate, save a PNG.

Run by `bench.warm_cold` in a fresh interpreter: `python -m bench.oneshot MODEL OUT SEED STEPS`.
"""

from __future__ import annotations

import sys

import torch
from diffusers import AutoPipelineForText2Image

from bench.common import PROMPT


def main() -> None:
    model, out, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pipe = AutoPipelineForText2Image.from_pretrained(model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    image = pipe(PROMPT, num_inference_steps=steps, generator=generator).images[0]
    image.save(out)


if __name__ == "__main__":
    main()
