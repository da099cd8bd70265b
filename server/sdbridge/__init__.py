"""sdbridge: Stable Diffusion inside the image editors artists already use."""

__version__ = "0.1.0"
