"""The embedded default model: a tiny text-to-image latent diffusion model shipped in the package.

Kept free of heavy imports so the daemon can locate the model without loading torch.
"""

from pathlib import Path

NAME = "sdbridge-tiny"
MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
