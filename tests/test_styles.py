"""Style presets: one file of named prompt additions and parameters, read by every front-end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import sdbridge
from PIL import Image

from sdbridge.editor.session import LoraChoice, Settings
from sdbridge.editor.styles import (
    Style,
    StyleError,
    delete_style,
    load_styles,
    save_style,
    styles_path,
)

INK = Style(
    "ink",
    prompt="{prompt}, ink drawing",
    negative_prompt="colour",
    num_inference_steps=8,
    guidance_scale=4.0,
    scheduler="Euler a",
    loras=(LoraChoice("ink", 0.7),),
)


def test_a_style_wraps_the_prompt_and_fills_only_what_the_artist_left_unset():
    styled = INK.apply(Settings("a cat", negative_prompt="blurry", num_inference_steps=3))
    assert styled.prompt == "a cat, ink drawing"
    assert styled.negative_prompt == "blurry, colour"
    assert styled.num_inference_steps == 3  # the artist's own
    assert (styled.guidance_scale, styled.scheduler) == (4.0, "Euler a")
    assert styled.loras == (LoraChoice("ink", 0.7),)
    # A prompt without the slot is added after the artist's.
    assert Style("x", prompt="watercolour").apply(Settings("a dog")).prompt == "a dog, watercolour"
    assert Style("y", prompt="oil, {prompt}").apply(Settings("a dog")).prompt == "oil, a dog"


def test_styles_are_saved_replaced_and_deleted_in_one_file(tmp_path: Path):
    path = tmp_path / "sdbridge" / "styles.json"
    assert load_styles(path) == {}
    save_style(INK, path)
    save_style(Style.of(Settings("-", guidance_scale=0.0, model="tiny"), "fast"), path)
    save_style(Style("ink", prompt="{prompt}, ink"), path)  # same name: replaced, in place
    styles = load_styles(path)
    assert list(styles) == ["ink", "fast"]
    assert styles["ink"] == Style("ink", prompt="{prompt}, ink")
    assert styles["fast"] == Style("fast", model="tiny", guidance_scale=0.0)
    delete_style("ink", path)
    assert list(load_styles(path)) == ["fast"]
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["styles.json"]  # no temporary left


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "not valid JSON"),
        ('{"styles": {}}', '"styles" list'),
        ('{"styles": [{"prompt": "x"}]}', 'non-empty "name"'),
        ('{"styles": [{"name": "a", "num_inference_steps": "8"}]}', "wrong type"),
        ('{"styles": [{"name": "a", "guidance_scale": true}]}', "wrong type"),
        ('{"styles": [{"name": "a", "colour": 1}]}', "unknown field(s) colour"),
        ('{"styles": [{"name": "a", "loras": [{"weight": 1}]}]}', "each LoRA"),
    ],
)
def test_a_malformed_styles_file_is_explained(tmp_path: Path, text: str, words: str):
    path = tmp_path / "styles.json"
    path.write_text(text)
    with pytest.raises(StyleError, match="styles.json") as error:
        load_styles(path)
    assert words in str(error.value)


def test_the_file_lives_in_the_users_config_folder_or_where_the_variable_says(monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/u/.cfg")
    monkeypatch.delenv("SDBRIDGE_STYLES", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert styles_path() == Path("/home/u/.cfg/sdbridge/styles.json")
    monkeypatch.setenv("SDBRIDGE_STYLES", "/tmp/s.json")
    assert styles_path() == Path("/tmp/s.json")


def test_the_cli_generates_in_a_style(daemon, tmp_path: Path):
    styles = tmp_path / "styles.json"
    save_style(Style("quick", prompt="{prompt}, flat colours", num_inference_steps=2), styles)
    out = tmp_path / "out.png"
    env = {"SDBRIDGE_STYLES": str(styles)}
    run = sdbridge(
        "generate", "a cat", "--style", "quick", "--address", daemon.address,
        "--width", "32", "--height", "32", "-o", str(out), env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with Image.open(out) as image:
        assert image.text["parameters"].startswith("a cat, flat colours\nSteps: 2,")
    unknown = sdbridge("generate", "a cat", "--style", "nope", env=env)
    assert unknown.returncode == 2 and "no style 'nope' (styles: quick)" in unknown.stderr
