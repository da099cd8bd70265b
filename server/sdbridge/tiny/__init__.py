"""The embedded default model: a tiny text-to-image latent diffusion model shipped in the package.

Kept free of heavy imports so the daemon can locate the model without loading torch.
"""

from pathlib import Path

NAME = "sdbridge-tiny"
MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
# Its ControlNet: where a scribble is, the object goes (tools/tiny/train_controlnet.py).
CONTROLNET_NAME = "sdbridge-tiny-scribble"
CONTROLNET_DIR: Path = MODEL_DIR.parent / "controlnet"


def is_present() -> bool:
    """Whether the trained weights are in the package (a checkout before training has none)."""
    return (MODEL_DIR / "model_index.json").is_file()


def controlnet_is_present() -> bool:
    return (CONTROLNET_DIR / "config.json").is_file()
