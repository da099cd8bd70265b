"""What an image records of how it was made: AUTOMATIC1111's `parameters` text.

Image browsers and A1111's "PNG Info" read it, and pasting it into A1111 makes the image again.
The daemon sends it with every result and `outputs` writes it into every PNG.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationInfo:
    """What A1111 records about an image; `to_parameters` renders its text format."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    denoising_strength: float | None = None
    # (name, weight) pairs, written into the prompt as A1111's `<lora:name:weight>` tags so that
    # pasting the parameters into A1111 applies them again.
    loras: tuple[tuple[str, float], ...] = ()
    hires_upscale: float | None = None  # the second pass's scale over the first image
    # (preprocessor, ControlNet name, strength, start, end) of each ControlNet, written last as
    # A1111's ControlNet extension writes them ("Module" is its name for the preprocessor).
    controls: tuple[tuple[str, str, float, float, float], ...] = ()

    def to_parameters(self) -> str:
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.cfg_scale:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model}",
        ]
        if self.denoising_strength is not None:
            fields.append(f"Denoising strength: {self.denoising_strength:g}")
        if self.hires_upscale is not None:
            fields.append(f"Hires upscale: {self.hires_upscale:.3g}")
        for i, (module, model, weight, start, end) in enumerate(self.controls):
            # Quoted as one value; a quote in a file name would end it early.
            name = _one_line(model).replace('"', "'")
            fields.append(
                f'ControlNet {i}: "Module: {module}, Model: {name}, Weight: {weight:g}, '
                f'Guidance Start: {start:g}, Guidance End: {end:g}"'
            )
        # Readers split the text into lines: a line break in a prompt would let it forge a
        # "Negative prompt:" or parameters line, so each prompt becomes one line.
        prompt = _one_line(self.prompt)
        lines = [prompt + "".join(f" <lora:{name}:{weight:g}>" for name, weight in self.loras)]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {_one_line(self.negative_prompt)}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _one_line(text: str) -> str:
    """``text`` with every line break (those `str.splitlines` knows) turned into a space."""
    return " ".join(text.splitlines())
