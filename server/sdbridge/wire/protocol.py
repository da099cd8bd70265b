"""Protocol v1: message schema, validation and images (docs/protocol.md is the contract).

Pure Python (stdlib + msgpack): this module is bundled into the Krita and GIMP plugins.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
DEFAULT_PORT = 7878
DEFAULT_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_PORT}"
ADDRESS_ENV = "SDBRIDGE_ADDRESS"
# The secret a daemon beyond loopback requires (docs/security.md); never on a command line.
TOKEN_ENV = "SDBRIDGE_TOKEN"
# PLAIN carries a username too; the daemon ignores it.
TOKEN_USERNAME = b"sdbridge"

TERMINAL_EVENTS = frozenset({"result", "error", "cancelled"})
IMAGE_FORMATS = ("raw", "png")
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256  # model, LoRA and scheduler names
MAX_LORAS = 8
MAX_LORA_WEIGHT = 10.0
MAX_CONTROLS = 4
MAX_CONTROL_STRENGTH = 2.0
# What the daemon can make of a control layer's pixels before its ControlNet sees them
# (docs/protocol.md, `control`): `none` takes the image as the ControlNet's input.
PREPROCESSORS = ("none", "scribble", "canny")
# A `hello` session key ties a client's results together across its connections: a secret the
# client draws at random, long enough that nobody guesses another client's.
MIN_SESSION_CHARS = 16
MAX_RESULTS_PAGE = 50
DEFAULT_RESULTS_PAGE = 20


class ErrorCode:
    """Stable error codes (docs/protocol.md, "Error codes")."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    BAD_TYPE = "bad_type"
    OUT_OF_RANGE = "out_of_range"
    BAD_IMAGE = "bad_image"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_SCHEDULER = "unknown_scheduler"
    UNKNOWN_LORA = "unknown_lora"
    LORA_LOAD_FAILED = "lora_load_failed"
    UNKNOWN_CONTROLNET = "unknown_controlnet"
    CONTROLNET_LOAD_FAILED = "controlnet_load_failed"
    MODEL_LOAD_FAILED = "model_load_failed"
    UNKNOWN_JOB = "unknown_job"
    BUSY = "busy"
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"
    # Made by clients, never sent by the daemon.
    CONNECTION_LOST = "connection_lost"
    TIMEOUT = "timeout"
    UNAUTHORIZED = "unauthorized"


class ProtocolError(Exception):
    """A request the daemon refuses: becomes an `error` event naming the field."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


# How many pixels one job may produce, from the memory it can use (docs/protocol.md, `limits`):
# half of it for the job (the rest holds the weights, and on a CPU the system and the editor),
# at a peak of 4 KiB per pixel: the VAE decoder's full-size stages hold 128-256 float32
# channels (0.5-1 KiB a pixel) per tensor, several alive at once, and its tiling is off.
JOB_MEMORY_SHARE = 2
JOB_BYTES_PER_PIXEL = 4096
MIN_PIXELS = 512 * 512  # below the smallest native size (SD 1.5) the daemon is of no use
DEFAULT_MEMORY_BYTES = 32 << 30  # what `Limits()` assumes when nobody measured the machine
# Room in a generate message beside its two images: prompts (4 bytes a character at most),
# names, numbers and the PNG container's bytes over the raw size.
MESSAGE_MARGIN_BYTES = 1 << 20
MAX_IMAGE_SIDE = 4096


def pixels_for_memory(memory_bytes: int, max_side: int = MAX_IMAGE_SIDE) -> int:
    """The largest width*height whose job fits in `memory_bytes` (at least MIN_PIXELS)."""
    fits = memory_bytes // JOB_MEMORY_SHARE // JOB_BYTES_PER_PIXEL
    return min(max_side * max_side, max(MIN_PIXELS, fits))


def message_bytes_for(max_pixels: int) -> int:
    """The largest generate message: init and mask image as raw RGBA at `max_pixels`."""
    return 2 * 4 * max_pixels + MESSAGE_MARGIN_BYTES


# Limits that `Limits.for_memory` sizes from the device's memory unless the operator sets them.
MEMORY_LIMITS = ("max_pixels", "max_message_bytes")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; reported by `hello` and enforced by `validate_request`.

    `Limits()` is sized for DEFAULT_MEMORY_BYTES; a daemon uses `Limits.for_memory` with what its
    device has.
    """

    max_message_bytes: int = message_bytes_for(pixels_for_memory(DEFAULT_MEMORY_BYTES))
    max_side: int = MAX_IMAGE_SIDE
    max_pixels: int = pixels_for_memory(DEFAULT_MEMORY_BYTES)
    max_steps: int = 150
    max_images: int = 8
    max_prompt_chars: int = 4000
    max_queue: int = 64
    max_queue_per_client: int = 16
    # Each connection can pin one half-sent message: at most max_connections * max_message_bytes.
    max_connections: int = 64

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")

    @classmethod
    def for_memory(cls, memory_bytes: int, **given: int) -> Limits:
        """The limits of a daemon whose jobs can use `memory_bytes` (the device's memory).

        `given` are the operator's own values and win; max_pixels follows from the memory and
        max_side unless given, max_message_bytes from max_pixels unless given.
        """
        max_side = given.get("max_side", MAX_IMAGE_SIDE)
        max_pixels = given.get("max_pixels", pixels_for_memory(memory_bytes, max_side))
        derived = {"max_pixels": max_pixels, "max_message_bytes": message_bytes_for(max_pixels)}
        return cls(**{**derived, **given})

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --- wire encoding -----------------------------------------------------------------------------


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one message body; anything but a msgpack map is a `bad_message`."""
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message must be a msgpack map")
    return message


def event(name: str, request_id: str | None, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "event": name, "id": request_id, **fields}


def error_event(request_id: str | None, error: ProtocolError) -> dict[str, Any]:
    return event("error", request_id, code=error.code, message=error.message, field=error.field)


# --- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An image as it travels: raw RGBA8 rows top to bottom, or a PNG file."""

    width: int
    height: int
    data: bytes
    format: str = "raw"

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, value: Any, field_name: str, limits: Limits) -> Image:
        if not isinstance(value, dict):
            raise ProtocolError(
                ErrorCode.BAD_TYPE, f"{field_name} must be an image map", field_name
            )
        unknown = set(value) - {"width", "height", "format", "data"}
        if unknown:
            # Keys may mix str and bytes, which do not sort together.
            name = sorted(map(repr, unknown))[0]
            raise ProtocolError(
                ErrorCode.UNKNOWN_FIELD, f"{field_name} has an unknown field {name}", field_name
            )
        width = _int_in(value, "width", 1, limits.max_side, field_name)
        height = _int_in(value, "height", 1, limits.max_side, field_name)
        if width * height > limits.max_pixels:
            raise ProtocolError(
                ErrorCode.BAD_IMAGE,
                f"{field_name}: {width}x{height} is more than {limits.max_pixels} pixels "
                "(limits.max_pixels)",
                field_name,
            )
        fmt = value.get("format", "raw")
        if fmt not in IMAGE_FORMATS:
            raise ProtocolError(
                ErrorCode.BAD_IMAGE, f"{field_name}.format must be 'raw' or 'png'", field_name
            )
        data = value.get("data")
        if not isinstance(data, bytes):
            raise ProtocolError(
                ErrorCode.BAD_IMAGE, f"{field_name}.data must be binary", field_name
            )
        if fmt == "raw" and len(data) != width * height * 4:
            raise ProtocolError(
                ErrorCode.BAD_IMAGE,
                f"{field_name}: raw RGBA data of {width}x{height} must be "
                f"{width * height * 4} bytes, got {len(data)}",
                field_name,
            )
        if fmt == "png":
            # The header's size, not the declared one, is what a decoder would allocate.
            try:
                real = png_size(data)
            except ValueError as exc:
                raise ProtocolError(
                    ErrorCode.BAD_IMAGE, f"{field_name}: {exc}", field_name
                ) from exc
            if real != (width, height):
                raise ProtocolError(
                    ErrorCode.BAD_IMAGE,
                    f"{field_name}: the PNG is {real[0]}x{real[1]}, declared {width}x{height}",
                    field_name,
                )
        return cls(width, height, data, fmt)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What a client most likely sent instead, to say so in the error.
OTHER_FORMATS = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk; ValueError says what is wrong.

    Reads 33 bytes and decodes no pixel: a size can be refused before anything is allocated.
    """
    if not data.startswith(PNG_SIGNATURE):
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            raise ValueError("the data is in the WebP format, not PNG")
        for magic, name in OTHER_FORMATS:
            if data.startswith(magic):
                raise ValueError(f"the data is in the {name} format, not PNG")
        raise ValueError("the data is not a PNG file (no PNG signature)")
    header = data[8:33]
    if len(header) < 25:
        raise ValueError("the PNG ends before its header (IHDR)")
    length, kind, body, crc = header[:4], header[4:8], header[8:21], header[21:]
    if kind != b"IHDR" or struct.unpack(">I", length)[0] != 13:
        raise ValueError("the PNG does not start with its header (IHDR)")
    if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
        raise ValueError("the PNG header (IHDR) is corrupt (CRC mismatch)")
    width, height = struct.unpack(">II", body[:8])
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise ValueError(f"the PNG header gives an invalid size {width}x{height}")
    return width, height


def _int_in(value: dict[str, Any], key: str, low: int, high: int, field_name: str) -> int:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, int):
        raise ProtocolError(
            ErrorCode.BAD_IMAGE, f"{field_name}.{key} must be an integer", field_name
        )
    if not low <= number <= high:
        raise ProtocolError(
            ErrorCode.BAD_IMAGE, f"{field_name}.{key} must be in {low}..{high}", field_name
        )
    return number


def encode_png(width: int, height: int, rgba: bytes) -> bytes:
    """A minimal RGBA8 PNG encoder (stdlib only) for clients that must send PNG."""
    stride = width * 4
    rows = b"".join(b"\x00" + rgba[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 6))
        + chunk(b"IEND", b"")
    )


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraWeight:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet of a job: its input image, how strongly and over which part of the steps
    it steers (diffusers' `controlnet_conditioning_scale`, `control_guidance_start`/`_end`)."""

    image: Image
    model: str | None  # None: the first listed ControlNet that fits the job's model
    preprocessor: str = "none"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass
class GenerateRequest:
    """A validated `generate` request; field names follow diffusers. None: the model's default."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    init_image: Image | None = None
    strength: float = 1.0
    mask_image: Image | None = None
    preview_every: int = 0
    output_format: str = "raw"
    model: str | None = None
    scheduler: str | None = None
    loras: tuple[LoraWeight, ...] = ()
    exact_size: bool = False
    refine_strength: float = 0.0
    live: bool = False
    control: tuple[ControlInput, ...] = ()

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask_image is not None else "img2img"

    def output_size(self, native_size: int) -> tuple[int, int]:
        """The result's size: as asked, else the init image's, else the model's native size
        (0: not known yet)."""
        init = self.init_image
        return (
            self.width or (init.width if init else native_size),
            self.height or (init.height if init else native_size),
        )

    def check_size(self, max_pixels: int, native_size: int = 0) -> None:
        """Refuse a result over `max_pixels`, a side left out counting as it will be (the init
        image's, the model's); `native_size` 0 (at validation): sides it gives go unchecked."""
        width, height = self.output_size(native_size)
        if not (width and height) or width * height <= max_pixels:
            return
        source = "the init image's" if self.init_image else "the model's native size"
        sides = (("width", self.width, width), ("height", self.height, height))
        taken = [f"{name} {side}: {source}" for name, asked, side in sides if asked is None]
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE,
            f"width x height must be at most {max_pixels} pixels; {width}x{height} is more"
            + (f" ({', '.join(taken)})" if taken else ""),
            "height" if self.height and not self.width else "width",
        )


COMMON_FIELDS = frozenset({"v", "op", "id"})
OP_FIELDS: dict[str, frozenset[str]] = {
    "hello": frozenset({"client", "session"}),
    "status": frozenset(),
    "models": frozenset(),
    "cancel": frozenset({"job"}),
    "results": frozenset({"before", "limit", "images"}),
    "generate": frozenset(
        {
            "prompt",
            "negative_prompt",
            "num_inference_steps",
            "guidance_scale",
            "seed",
            "width",
            "height",
            "num_images",
            "init_image",
            "strength",
            "mask_image",
            "preview_every",
            "output_format",
            "model",
            "scheduler",
            "loras",
            "exact_size",
            "refine_strength",
            "live",
            "control",
        }
    ),
}


def request_id(message: dict[str, Any]) -> str | None:
    """The request's id if it is usable for addressing the answer, else None."""
    rid = message.get("id")
    if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS:
        return rid
    return None


def validate_envelope(message: dict[str, Any]) -> tuple[str, str]:
    """Check version, op, id and field names; returns (op, id)."""
    version = message.get("v")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"unsupported protocol version {version!r}; "
            f"this daemon speaks {list(SUPPORTED_VERSIONS)}",
            "v",
        )
    rid = message.get("id")
    if rid is None:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "id is required", "id")
    if not isinstance(rid, str):
        raise ProtocolError(ErrorCode.BAD_TYPE, "id must be a string", "id")
    if not 0 < len(rid) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"id must be 1..{MAX_ID_CHARS} chars", "id")
    op = message.get("op")
    if not isinstance(op, str) or op not in OP_FIELDS:  # an unhashable op cannot be looked up
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}", "op")
    for name in message:
        if name not in COMMON_FIELDS and name not in OP_FIELDS[op]:
            raise ProtocolError(ErrorCode.UNKNOWN_FIELD, f"{op} has no field {name!r}", str(name))
    return op, rid


# The default of a field that must be present: nil is then a wrong type, not "use the default".
REQUIRED: Any = object()


def _get(message: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = message.get(name, default)
    if value is REQUIRED:
        raise ProtocolError(ErrorCode.MISSING_FIELD, f"{name} is required", name)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, kind):
        type_name = (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        )
        raise ProtocolError(ErrorCode.BAD_TYPE, f"{name} must be {type_name}", name)
    return value


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} must be in {low}..{high}", name)


def validate_generate(message: dict[str, Any], limits: Limits) -> GenerateRequest:
    """Turn a `generate` message into a request or raise a ProtocolError naming the field."""
    prompt = _get(message, "prompt", str, REQUIRED)
    negative = _get(message, "negative_prompt", str, "")
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > limits.max_prompt_chars:
            raise ProtocolError(
                ErrorCode.OUT_OF_RANGE,
                f"{name} is longer than {limits.max_prompt_chars} characters",
                name,
            )
    steps = _get(message, "num_inference_steps", int, None)
    if steps is not None:
        _check_range("num_inference_steps", steps, 1, limits.max_steps)
    guidance = _get(message, "guidance_scale", (int, float), None)
    if guidance is not None:
        guidance = float(guidance)
        _check_range("guidance_scale", guidance, 0.0, MAX_GUIDANCE)
    seed = _get(message, "seed", int, None)
    if seed is not None:
        _check_range("seed", seed, 0, MAX_SEED)
    width = _get(message, "width", int, None)
    height = _get(message, "height", int, None)
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            _check_range(name, side, 8, limits.max_side)
    num_images = _get(message, "num_images", int, 1)
    _check_range("num_images", num_images, 1, limits.max_images)
    preview_every = _get(message, "preview_every", int, 0)
    _check_range("preview_every", preview_every, 0, limits.max_steps)
    output_format = _get(message, "output_format", str, "raw")
    if output_format not in IMAGE_FORMATS:
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE, "output_format must be 'raw' or 'png'", "output_format"
        )
    model = _name(message, "model")
    scheduler = _name(message, "scheduler")
    loras = _loras(message)
    control = _control(message, limits)
    exact_size = _flag(message, "exact_size")
    live = _flag(message, "live")
    refine_strength = float(_get(message, "refine_strength", (int, float), 0.0))
    _check_range("refine_strength", refine_strength, 0.0, 1.0)

    init_image = None
    if message.get("init_image") is not None:
        init_image = Image.from_dict(message["init_image"], "init_image", limits)
    mask_image = None
    if message.get("mask_image") is not None:
        if init_image is None:
            raise ProtocolError(
                ErrorCode.MISSING_FIELD, "mask_image needs an init_image", "init_image"
            )
        mask_image = Image.from_dict(message["mask_image"], "mask_image", limits)
    strength = float(_get(message, "strength", (int, float), 0.75 if init_image else 1.0))
    if not (0.0 < strength <= 1.0) or not math.isfinite(strength):
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, "strength must be in (0, 1]", "strength")
    if strength < 1.0 and init_image is None:
        raise ProtocolError(
            ErrorCode.MISSING_FIELD, "strength below 1 needs an init_image", "init_image"
        )
    request = GenerateRequest(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        width=width,
        height=height,
        num_images=num_images,
        init_image=init_image,
        strength=strength,
        mask_image=mask_image,
        preview_every=preview_every,
        output_format=output_format,
        model=model,
        scheduler=scheduler,
        loras=loras,
        exact_size=exact_size,
        refine_strength=refine_strength,
        live=live,
        control=control,
    )
    request.check_size(limits.max_pixels)  # the model's native size is the engine's to check
    return request


def _flag(message: dict[str, Any], field_name: str) -> bool:
    value = message.get(field_name, False)
    if not isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_TYPE, f"{field_name} must be a boolean", field_name)
    return value


def _name(message: dict[str, Any], field_name: str) -> str | None:
    """A model, LoRA or scheduler name: the daemon looks it up, never opens it as a path."""
    name = _get(message, field_name, str, None)
    if name is not None and not 0 < len(name) <= MAX_NAME_CHARS:
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE, f"{field_name} must be 1..{MAX_NAME_CHARS} chars", field_name
        )
    return name


def _loras(message: dict[str, Any]) -> tuple[LoraWeight, ...]:
    items = _get(message, "loras", list, [])
    if len(items) > MAX_LORAS:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"at most {MAX_LORAS} loras", "loras")
    loras = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.BAD_TYPE, "each of loras must be a map", "loras")
        unknown = [key for key in item if key not in ("name", "weight")]
        if unknown:
            raise ProtocolError(
                ErrorCode.UNKNOWN_FIELD, f"loras has an unknown field {unknown[0]!r}", "loras"
            )
        if "name" not in item:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "each of loras needs a name", "loras")
        name, weight = item["name"], item.get("weight", 1.0)
        # Named as the field `loras`, like every other fault inside its entries.
        if (
            not isinstance(name, str)
            or isinstance(weight, bool)
            or not isinstance(weight, (int, float))
        ):
            raise ProtocolError(
                ErrorCode.BAD_TYPE, "a lora name must be str, its weight int or float", "loras"
            )
        if not 0 < len(name) <= MAX_NAME_CHARS or not (
            math.isfinite(weight) and abs(weight) <= MAX_LORA_WEIGHT
        ):
            raise ProtocolError(
                ErrorCode.OUT_OF_RANGE,
                f"a lora name is 1..{MAX_NAME_CHARS} chars, its weight in "
                f"-{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}",
                "loras",
            )
        loras.append(LoraWeight(name, float(weight)))
    return tuple(loras)


CONTROL_FIELDS = ("image", "model", "preprocessor", "strength", "start", "end")


def _control(message: dict[str, Any], limits: Limits) -> tuple[ControlInput, ...]:
    """The `control` list; every fault inside an entry is named as the field `control`."""
    items = _get(message, "control", list, [])
    if len(items) > MAX_CONTROLS:
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE, f"at most {MAX_CONTROLS} control entries", "control"
        )
    controls = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.BAD_TYPE, "each control entry must be a map", "control")
        unknown = sorted(repr(key) for key in item if key not in CONTROL_FIELDS)
        if unknown:
            raise ProtocolError(
                ErrorCode.UNKNOWN_FIELD,
                f"a control entry has an unknown field {unknown[0]}",
                "control",
            )
        if item.get("image") is None:
            raise ProtocolError(
                ErrorCode.MISSING_FIELD, "each control entry needs 'image'", "control"
            )
        model, preprocessor = item.get("model"), item.get("preprocessor", "none")
        numbers = [
            item.get(key, default)
            for key, default in (("strength", 1.0), ("start", 0.0), ("end", 1.0))
        ]
        if (
            not isinstance(model, (str, type(None)))
            or not isinstance(preprocessor, str)
            or any(isinstance(n, bool) or not isinstance(n, (int, float)) for n in numbers)
        ):
            raise ProtocolError(
                ErrorCode.BAD_TYPE,
                "a control entry's model (or nil) and preprocessor are str; strength, start "
                "and end int or float",
                "control",
            )
        strength, start, end = (float(n) for n in numbers)
        if model is not None and not 0 < len(model) <= MAX_NAME_CHARS:
            raise ProtocolError(
                ErrorCode.OUT_OF_RANGE,
                f"a control entry's model is 1..{MAX_NAME_CHARS} chars",
                "control",
            )
        if preprocessor not in PREPROCESSORS:
            raise ProtocolError(
                ErrorCode.OUT_OF_RANGE,
                f"unknown preprocessor {preprocessor[:MAX_NAME_CHARS]!r}; choose one of "
                f"{', '.join(PREPROCESSORS)}",
                "control",
            )
        if not (
            0.0 <= strength <= MAX_CONTROL_STRENGTH and 0.0 <= start < end <= 1.0
        ):  # NaN fails every comparison
            raise ProtocolError(
                ErrorCode.OUT_OF_RANGE,
                f"a control entry's strength is in 0..{MAX_CONTROL_STRENGTH:g}, and "
                "0 <= start < end <= 1",
                "control",
            )
        image = Image.from_dict(item["image"], "control", limits)
        controls.append(ControlInput(image, model, preprocessor, strength, start, end))
    return tuple(controls)


def validate_cancel(message: dict[str, Any]) -> str:
    return _get(message, "job", str, REQUIRED)


def validate_hello(message: dict[str, Any]) -> str | None:
    """The `hello`'s session key, or None."""
    _get(message, "client", str, None)
    session = _get(message, "session", str, None)
    if session is not None and not MIN_SESSION_CHARS <= len(session) <= MAX_ID_CHARS:
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE,
            f"session must be {MIN_SESSION_CHARS}..{MAX_ID_CHARS} chars (a random key)",
            "session",
        )
    return session


@dataclass(frozen=True)
class ResultsQuery:
    """A validated `results` request: a page of saved results, newest first."""

    before: int | None = None  # only results numbered below this
    limit: int = DEFAULT_RESULTS_PAGE
    images: bool = False  # each result's PNG file too


def validate_results(message: dict[str, Any]) -> ResultsQuery:
    before = _get(message, "before", int, None)
    if before is not None:
        _check_range("before", before, 1, 2**63 - 1)
    limit = _get(message, "limit", int, DEFAULT_RESULTS_PAGE)
    _check_range("limit", limit, 1, MAX_RESULTS_PAGE)
    return ResultsQuery(before, limit, _flag(message, "images"))
