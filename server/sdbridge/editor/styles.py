"""Style presets: named prompt additions and parameters that an artist saves and picks.

One JSON file holds them all, read by the Krita docker, the GIMP plug-in and
`sdbridge generate --style NAME`: ``$SDBRIDGE_STYLES``, else `styles.json` in the user's
sdbridge config folder. A style's prompt is a template: ``{prompt}`` stands for what the artist
typed (a template without it is added after the artist's prompt). Its parameters fill what the
artist left at "model default"; what the artist set wins.

    {"version": 1, "styles": [
      {"name": "ink", "prompt": "{prompt}, ink drawing, crosshatching",
       "negative_prompt": "colour", "num_inference_steps": 8, "guidance_scale": 4.0,
       "scheduler": "Euler a", "model": "dreamshaper-8", "loras": [{"name": "ink", "weight": 0.7}]}
    ]}

Pure Python: it runs inside Krita and GIMP.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import config_dir
from .session import LoraChoice, Settings

STYLES_ENV = "SDBRIDGE_STYLES"
FILE_VERSION = 1
PROMPT_SLOT = "{prompt}"
# The parameters a style may carry, with their JSON types (bool is no int here).
_PARAMETERS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "num_inference_steps": (int,),
    "guidance_scale": (int, float),
    "scheduler": (str,),
}


# The Settings fields a style carries besides its prompts.
CARRIED = ("model", "num_inference_steps", "guidance_scale", "scheduler", "loras")


class StyleError(ValueError):
    """The styles file cannot be read or a style is malformed; the message says where."""


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = PROMPT_SLOT
    negative_prompt: str = ""
    model: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    loras: tuple[LoraChoice, ...] = ()

    def apply(self, settings: Settings) -> Settings:
        """The artist's settings in this style: prompts combined, unset parameters filled."""
        template = self.prompt if PROMPT_SLOT in self.prompt else f"{PROMPT_SLOT}, {self.prompt}"
        prompt = template.replace(PROMPT_SLOT, settings.prompt).strip(" ,")
        negative = ", ".join(p for p in (settings.negative_prompt, self.negative_prompt) if p)
        filled = {name: _chosen(getattr(settings, name), getattr(self, name)) for name in CARRIED}
        return replace(settings, prompt=prompt, negative_prompt=negative, **filled)

    @staticmethod
    def of(settings: Settings, name: str, prompt: str = PROMPT_SLOT) -> Style:
        """A style that keeps the parameters the artist set in `settings` (for "Save style")."""
        carried = {field: getattr(settings, field) for field in CARRIED}
        return Style(name, prompt, settings.negative_prompt, **carried)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "prompt": self.prompt}
        if self.negative_prompt:
            entry["negative_prompt"] = self.negative_prompt
        for key in _PARAMETERS:
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        if self.loras:
            entry["loras"] = [{"name": lora.name, "weight": lora.weight} for lora in self.loras]
        return entry

    @staticmethod
    def from_dict(entry: Any, where: str) -> Style:
        if not isinstance(entry, dict):
            raise StyleError(f"{where}: a style is a JSON object")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise StyleError(f'{where}: a style needs a non-empty "name"')
        where = f"{where} ({name!r})"
        for key in ("prompt", "negative_prompt"):
            if not isinstance(entry.get(key, ""), str):
                raise StyleError(f"{where}: {key!r} must be text")
        unknown = set(entry) - {"name", "prompt", "negative_prompt", "loras", *_PARAMETERS}
        if unknown:
            raise StyleError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for key, kinds in _PARAMETERS.items():
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise StyleError(f"{where}: {key!r} has the wrong type")
        guidance = entry.get("guidance_scale")
        return Style(
            name=name.strip(),
            prompt=entry.get("prompt", PROMPT_SLOT),
            negative_prompt=entry.get("negative_prompt", ""),
            model=entry.get("model"),
            num_inference_steps=entry.get("num_inference_steps"),
            guidance_scale=None if guidance is None else float(guidance),
            scheduler=entry.get("scheduler"),
            loras=_loras(entry.get("loras", []), where),
        )


def _chosen(artists: Any, styles: Any) -> Any:
    """The artist's value unless it was left at "model default" (guidance 0 is a choice)."""
    return styles if artists is None or artists in ("", ()) else artists


def _loras(value: Any, where: str) -> tuple[LoraChoice, ...]:
    if not isinstance(value, list):
        raise StyleError(f'{where}: "loras" is a list')
    loras = []
    for lora in value:
        weight = lora.get("weight", 1.0) if isinstance(lora, dict) else None
        if (
            not isinstance(lora, dict)
            or not isinstance(lora.get("name"), str)
            or isinstance(weight, bool)
            or not isinstance(weight, int | float)
        ):
            raise StyleError(f'{where}: each LoRA is {{"name": text, "weight": number}}')
        loras.append(LoraChoice(lora["name"], float(weight)))
    return tuple(loras)


def styles_path() -> Path:
    """$SDBRIDGE_STYLES, else `styles.json` in this user's sdbridge config folder."""
    given = os.environ.get(STYLES_ENV)
    return Path(given).expanduser() if given else config_dir() / "styles.json"


def load_styles(path: Path | None = None) -> dict[str, Style]:
    """Every style by name, in the file's order; no file: none. Raises `StyleError`."""
    path = path or styles_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StyleError(f"cannot read the styles file {path}: {exc.strerror or exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise StyleError(f"the styles file {path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("styles"), list):
        raise StyleError(f'the styles file {path} needs a "styles" list')
    styles: dict[str, Style] = {}
    for index, entry in enumerate(document["styles"]):
        style = Style.from_dict(entry, f"{path}, style {index + 1}")
        styles[style.name] = style
    return styles


def save_style(style: Style, path: Path | None = None) -> None:
    """Adds `style` to the file, or replaces the one of that name. The file is replaced whole
    (a temporary file renamed over it), so a crash never leaves half a file."""
    path = path or styles_path()
    styles = load_styles(path)
    styles[style.name] = style
    _write(path, styles)


def delete_style(name: str, path: Path | None = None) -> None:
    path = path or styles_path()
    styles = load_styles(path)
    if styles.pop(name, None) is not None:
        _write(path, styles)


def _write(path: Path, styles: dict[str, Style]) -> None:
    document = {"version": FILE_VERSION, "styles": [s.to_dict() for s in styles.values()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".styles-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, ensure_ascii=False)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
