"""Train the embedded tiny model from scratch on procedural scenes and save a diffusers folder.

    python -m tools.tiny.train [--out DIR] [--minutes-budget 78] [--device cuda]

Phase 1 trains a narrow AutoencoderKL (x8, 4 latent channels) on crops around objects, then
its decoder alone on full scenes (--decoder-only does just that to an existing model); phase 2
encodes a pool of scenes once (the encoder is the costliest forward pass, so it is not re-run
per step), each at one of the sizes the engine generates at (buckets(): every aspect ratio from
1:2 to 2:1 at about 128x128's area), and trains the CLIP text encoder and the UNet jointly with
v-prediction on a cosine noise schedule, each batch from one bucket: 65% of it drawn from the
noisiest fifth of the timesteps (where the layout is decided) and the rest from all of them,
caption dropout for classifier-free guidance, another scene's caption at low noise (so that
img2img at a low strength keeps its init image), a loss weight that is full at high noise and
capped at low noise, extra weight on the latent cells that show an object, and EMA.
Everything runs in fp32: bf16 autocast is faster only on CPUs with AVX512-BF16 and 10-20x
slower on AVX2-only ones.
Fixed step counts (the default) make a run reproducible; --minutes-budget instead trains each
phase for a share of the wall time (VAE 18%, decoder 5%, encoding at most 6%, the rest
diffusion).
--init DIR starts from a trained model folder instead of from scratch: its VAE's encoder, and so
its latent space and scaling factor, stay as they are (no crop phase; the decoder is fine-tuned
as above), and its text encoder and UNet are trained on at a lower learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdbridge.daemon.resolution import SizeRange
from sdbridge.tiny import MODEL_DIR, NAME

from .scenes import BACKGROUNDS, SIZE, Scene, caption, render, sample_scene
from .tokenizer import MAX_LENGTH, build_tokenizer

# The generation sizes the engine picks for the embedded model (sdbridge.json "sizes"): the
# canvas's aspect ratio at about the native area, in multiples of 8; training covers aspect
# ratios up to ASPECT_LIMIT either way.
SIZES = SizeRange(SIZE, SIZE, 8)
ASPECT_LIMIT = 2.0
OBJECT_WEIGHT = 4.0  # extra diffusion-loss weight of latent cells that show an object
HIGH_NOISE_START = 800  # timesteps from here on decide the layout
HIGH_NOISE_FRACTION = 0.65  # share of each diffusion batch drawn from those timesteps
CAPTION_DROPOUT = 0.15  # empty captions: the unconditional branch of CFG
# Share of diffusion scenes moved onto the background a caption without one means: with the
# scenes already there, about a third are on it, and 60% of their captions leave it out.
PLAIN_SHARE = 0.25
# Below MISMATCH_FULL the caption is another scene's MISMATCH_SHARE of the time, fading to never
# at MISMATCH_END: where the noisy latent already shows the picture, it and not the prompt
# decides, so img2img at a low strength keeps its init image whatever the prompt says. A
# quarter, not nine in ten or half: a caption that is often wrong at low noise is ignored there,
# where a small object's outline and a star's arms are settled, and held-out red and purple
# stars were then painted in the colours and shapes those colours had in training.
MISMATCH_FULL, MISMATCH_END, MISMATCH_SHARE = 250, 500, 0.25
# Peak learning rates of the diffusion phase: from scratch, and on from a trained model (--init),
# whose colours and shapes a full rate would first wash out.
DIFFUSION_LR, FINETUNE_LR = 1e-3, 4e-4


def buckets() -> list[tuple[int, int]]:
    """Every (width, height) the engine can pick for aspect ratios from 1:2 to 2:1."""
    ratios = np.exp(np.linspace(-np.log(ASPECT_LIMIT), np.log(ASPECT_LIMIT), 401))
    return sorted(
        {SIZES.fit(round(1000 * math.sqrt(r)), round(1000 / math.sqrt(r))) for r in ratios}
    )


def bucket_scene(
    seed: int,
    sizes: list[tuple[int, int]],
    rng: np.random.Generator,
    sample: Callable[..., Scene] = sample_scene,
) -> Scene:
    """A training scene from `sample` at a random bucket; the square one, the commonest canvas,
    twice as often."""
    weights = np.array([2.0 if w == h else 1.0 for w, h in sizes])
    width, height = sizes[int(rng.choice(len(sizes), p=weights / weights.sum()))]
    return sample(seed, width=width, height=height)


def build_vae() -> AutoencoderKL:
    # Flat-coloured scenes need little capacity; no mid-block attention keeps it cheap at any size.
    # GroupNorm normalises each group of channels per image: with 2 channels per group a flat
    # region keeps about one bit per group, and colours came out shifted (red as orange), so
    # the groups here hold 8 or more channels.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    # Attention only at 8x8 and 4x4: at 16x16 it would dominate CPU inference time.
    return UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=4,  # 8+ channels per group, as in the VAE
    )


def build_noise_scheduler() -> DDPMScheduler:
    # The cosine schedule ends near zero SNR, so the background colour is not fixed by the
    # starting noise's mean; v-prediction stays well-posed there.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
    )


def load_init(
    folder: Path, tokenizer: CLIPTokenizer
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """A trained model's VAE, text encoder and UNet to train on from; its tokenizer must be the
    grammar's, or its text encoder's embeddings would mean other words."""
    if CLIPTokenizer.from_pretrained(folder / "tokenizer").get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"{folder}: its tokenizer is not this grammar's; train from scratch")
    return (
        AutoencoderKL.from_pretrained(folder / "vae"),
        CLIPTextModel.from_pretrained(folder / "text_encoder"),
        UNet2DConditionModel.from_pretrained(folder / "unet"),
    )


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_at(step: int, progress: float, peak: float, warmup: int = 50) -> float:
    """Linear warm-up over the first steps, then cosine decay over the phase's progress."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))


def to_tensor(images: Iterable[np.ndarray]) -> torch.Tensor:
    array = np.stack(list(images)).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def run_phase(
    run_step: Callable[[int, float], float], steps: int, seconds: float | None, label: str
) -> tuple[int, float]:
    """Run a phase for a fixed number of steps, or, with a time budget, until it is spent.

    With a budget, progress (which drives the learning rate) is the fraction of wall time
    used: on a machine shared with other work the speed changes during a run, and a step
    count fixed up front would overrun.
    """
    started = time.monotonic()
    step = 0
    progress = 0.0
    while progress < 1:
        loss = run_step(step, progress)
        step += 1
        elapsed = time.monotonic() - started
        progress = elapsed / seconds if seconds is not None else step / steps
        if step % 50 == 0 or progress >= 1:
            print(
                f"[{label}] step {step} progress {min(progress, 1):.0%} loss {loss:.4f} "
                f"{elapsed:.0f} s",
                flush=True,
            )
    return step, time.monotonic() - started


def object_crop(scene: Scene, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A crop around one of the scene's objects, on the latent grid (a multiple of 8 px)."""
    cx, cy = scene.centre(scene.objects[int(rng.integers(len(scene.objects)))])
    x0, y0 = (
        int(np.clip(c - crop // 2 + rng.integers(-12, 13), 0, side - crop)) // 8 * 8
        for c, side in ((cx, scene.width), (cy, scene.height))
    )
    return render(scene)[y0 : y0 + crop, x0 : x0 + crop]


def train_vae(vae: AutoencoderKL, steps: int, seconds: float | None) -> tuple[int, float]:
    # Objects cover a few percent of a scene, so random crops or whole scenes teach mostly
    # background: 64 px crops around an object learn object colour and shape several times
    # faster per second.
    rng = np.random.default_rng(1)
    sizes = buckets()
    device = vae.device
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0, fused=True)
    batch, crop = 16, 64
    # Start with a tiny posterior variance: unit noise on the initial near-zero means would
    # drown what the encoder has to say until the KL-free means grew past it.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0

    def step_fn(step: int, progress: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, 2e-3)
        scenes = (bucket_scene(int(rng.integers(2**31)), sizes, rng) for _ in range(batch))
        x = to_tensor(object_crop(scene, crop, rng) for scene in scenes).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    vae.train()
    result = run_phase(step_fn, steps, seconds, "vae")
    vae.eval()
    return result


def finetune_decoder(vae: AutoencoderKL, steps: int, seconds: float | None) -> tuple[int, float]:
    """Train only the decoder on full scenes (one bucket per batch) through the frozen encoder.

    The crop-trained decoder blurs objects and draws a line along the bottom edge of full
    images; a frozen encoder keeps the latents, and so any UNet trained on them, valid.
    """
    rng = np.random.default_rng(3)
    generator = torch.Generator().manual_seed(3)
    sizes = buckets()
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(trained, lr=5e-4, weight_decay=0.0, fused=True)
    batch = 4

    def step_fn(step: int, progress: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, 5e-4)
        width, height = sizes[int(rng.integers(len(sizes)))]
        x = to_tensor(
            render(sample_scene(int(rng.integers(2**31)), width=width, height=height))
            for _ in range(batch)
        )
        x = x.to(vae.device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator)
        loss = (vae.decode(latents).sample - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        return loss.item()

    vae.decoder.train()
    result = run_phase(step_fn, steps, seconds, "decoder")
    vae.eval()
    return result


def object_mask(scene: Scene, image: np.ndarray) -> torch.Tensor:
    """Which latent cells show an object: at least 8 of their 64 pixels differ from the
    background (a lone night-sky star does not count)."""
    differs = np.any(image != np.array(BACKGROUNDS[scene.background], dtype=np.uint8), axis=-1)
    cells = differs.reshape(scene.height // 8, 8, scene.width // 8, 8).sum(axis=(1, 3))
    return torch.from_numpy(cells >= 8)[None]


@dataclasses.dataclass
class Bucket:
    """Scenes of one size encoded once: posterior means and deviations, where objects are."""

    scenes: list[Scene]
    means: torch.Tensor
    stds: torch.Tensor
    masks: torch.Tensor


@dataclasses.dataclass
class Pool:
    buckets: list[Bucket]

    @property
    def scenes(self) -> list[Scene]:
        return [s for b in self.buckets for s in b.scenes]

    def latent_std(self, generator: torch.Generator) -> float:
        """The standard deviation of latents sampled from every scene's posterior."""
        samples = [
            (b.means + b.stds * torch.randn(b.means.shape, generator=generator)).flatten()
            for b in self.buckets
        ]
        return float(torch.cat(samples).std())


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL,
    count: int,
    seconds: float | None,
    sample: Callable[..., Scene] = sample_scene,
) -> Pool:
    """Encode up to `count` scenes from `sample` once (at least 2048), stopping early when
    `seconds` run out; the scenes are spread over the buckets and encoded a bucket's chunk at a
    time."""
    started = time.monotonic()
    rng = np.random.default_rng(4)
    sizes = buckets()
    scenes = [bucket_scene(100_000 + i, sizes, rng, sample) for i in range(count)]
    by_size: dict[tuple[int, int], list[Scene]] = {size: [] for size in sizes}
    for scene in scenes:
        by_size[scene.width, scene.height].append(scene)
    # Chunks in the order of the scenes' seeds, so a budget cut leaves every bucket filled.
    chunks = [
        group[start : start + 32]
        for group in by_size.values()
        for start in range(0, len(group), 32)
    ]
    chunks.sort(key=lambda chunk: chunk[0].seed)
    encoded: dict[tuple[int, int], list[tuple[Scene, torch.Tensor, torch.Tensor, torch.Tensor]]]
    encoded = {size: [] for size in sizes}
    done = 0
    for chunk in chunks:
        if seconds is not None and done >= 2048 and time.monotonic() - started > seconds:
            break
        images = [render(s) for s in chunk]
        dist = vae.encode(to_tensor(images).to(vae.device)).latent_dist
        for i, (scene, image) in enumerate(zip(chunk, images, strict=True)):
            encoded[scene.width, scene.height].append(
                (scene, dist.mean[i], dist.std[i], object_mask(scene, image))
            )
        done += len(chunk)
    return Pool(
        [
            Bucket(
                [e[0] for e in entries],
                torch.stack([e[1] for e in entries]),
                torch.stack([e[2] for e in entries]),
                torch.stack([e[3] for e in entries]).to(vae.device),
            )
            for entries in encoded.values()
            if entries
        ]
    )


def train_diffusion(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    pool: Pool,
    steps: int,
    seconds: float | None,
    peak_lr: float = DIFFUSION_LR,
) -> tuple[int, float]:
    device = unet.device
    every_scene = pool.scenes
    shares = np.array([len(b.scenes) for b in pool.buckets], dtype=np.float64)
    shares /= shares.sum()
    noise_scheduler = build_noise_scheduler()
    alphas = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    scale = vae.config.scaling_factor
    rng = np.random.default_rng(2)
    generator = torch.Generator().manual_seed(2)
    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in trained]
    opt = torch.optim.AdamW(trained, lr=peak_lr, weight_decay=0.01, fused=True)
    # With 8-channel heads the plain matmul attention trains a quarter faster on a CPU than
    # torch's fused kernel (0.33 s against 0.44 s a step); only training uses it.
    unet.set_attn_processor(AttnProcessor())
    batch = 32  # more, smaller updates: the budget buys only a few thousand steps

    def text_for(scene: Scene, t: int) -> str:
        if rng.random() < CAPTION_DROPOUT:
            return ""
        mismatch = MISMATCH_SHARE * np.clip(
            (MISMATCH_END - t) / (MISMATCH_END - MISMATCH_FULL), 0.0, 1.0
        )
        if rng.random() < mismatch:
            scene = every_scene[int(rng.integers(len(every_scene)))]
        return caption(scene, rng)

    def step_fn(step: int, progress: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, peak_lr)
        bucket = pool.buckets[int(rng.choice(len(pool.buckets), p=shares))]
        index = torch.from_numpy(rng.integers(0, len(bucket.scenes), size=batch)).to(device)
        sample = torch.randn((batch, *bucket.means.shape[1:]), generator=generator).to(device)
        # No left-right flips: the VAE encoder pads only on the right before each downsampling,
        # so a flipped latent's right edge is a left edge. Flipped latents taught the UNet an
        # average of both edges, which the decoder painted as a darker right-hand column.
        latents = (bucket.means[index] + bucket.stds[index] * sample) * scale
        masks = bucket.masks[index]
        # Objects are the hard part and a few percent of the cells: weigh their error up.
        cell_weight = 1 + OBJECT_WEIGHT * masks.float()
        t = torch.randint(0, 1000, (batch,), generator=generator)
        # Where each object goes is settled in the noisiest steps, and uniform sampling gave
        # them too few updates to tell the corners apart: draw part of the batch from there.
        high = torch.rand(batch, generator=generator) < HIGH_NOISE_FRACTION
        t = torch.where(high, HIGH_NOISE_START + t % (1000 - HIGH_NOISE_START), t)
        texts = [
            text_for(bucket.scenes[i], int(step_t))
            for i, step_t in zip(index.tolist(), t.tolist(), strict=True)
        ]
        t = t.to(device)
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        # Cap the weight of easy low-noise steps (min-SNR-5 in its v-prediction form, v-loss
        # weight 5 / (snr + 1)) but keep full weight where noise is high: those steps decide the
        # layout, and min(snr, 5) / (snr + 1) would give them none (snr reaches 0 here).
        weight = torch.clamp(5.0 / (snr[t] + 1), max=1.0)
        error = (cell_weight * (pred - target).pow(2)).mean(dim=(1, 2, 3))
        loss = (weight * error / cell_weight.mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in trained], 1 - decay)
        return loss.item()

    unet.train()
    text_encoder.train()
    result = run_phase(step_fn, steps, seconds, "unet")
    with torch.no_grad():
        for p, e in zip(trained, ema, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return result


def build_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """The trained components as the pipeline that is saved, with its sampling scheduler."""
    scheduler = DPMSolverMultistepScheduler.from_config(
        build_noise_scheduler().config, timestep_spacing="trailing", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument(
        "--minutes-budget",
        type=float,
        default=None,
        help="fit step counts to this wall time (overrides the step counts)",
    )
    parser.add_argument("--vae-steps", type=int, default=4800)
    parser.add_argument("--decoder-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=11000)
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="only fine-tune the decoder of the model already in --out, and save it back",
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this trained model folder (same tokenizer) instead of from scratch",
    )
    parser.add_argument("--pool", type=int, default=8192, help="scenes encoded for phase 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="e.g. cuda: the recipe is the same")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()
    budget = None if args.minutes_budget is None else args.minutes_budget * 60
    if args.decoder_only:
        vae = AutoencoderKL.from_pretrained(args.out / "vae").to(args.device)
        decoder_steps, decoder_s = finetune_decoder(vae, args.decoder_steps, budget)
        vae.to("cpu").save_pretrained(args.out / "vae")
        info_path = args.out / "sdbridge.json"
        info = json.loads(info_path.read_text())
        info["training"].update(decoder_steps=decoder_steps, decoder_seconds=round(decoder_s))
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"decoder saved to {args.out / 'vae'}", flush=True)
        return
    tokenizer = build_tokenizer()
    if args.init is None:
        vae, text_encoder, unet = build_vae(), build_text_encoder(tokenizer), build_unet()
    else:
        vae, text_encoder, unet = load_init(args.init, tokenizer)
    for module in (vae, text_encoder, unet):
        module.to(args.device)
    print(f"params: vae {params(vae):,} text {params(text_encoder):,} unet {params(unet):,}")

    if args.init is None:
        vae_budget = None if budget is None else 0.18 * budget
        vae_steps, vae_s = train_vae(vae, args.vae_steps, vae_budget)
    else:
        vae_steps, vae_s = 0, 0.0
    decoder_steps, decoder_s = finetune_decoder(
        vae, args.decoder_steps, None if budget is None else 0.05 * budget
    )
    pool = encode_pool(
        vae,
        args.pool,
        None if budget is None else 0.06 * budget,
        functools.partial(sample_scene, plain=PLAIN_SHARE),
    )
    if args.init is None:
        vae.register_to_config(
            scaling_factor=1.0 / pool.latent_std(torch.Generator().manual_seed(5))
        )
    scale = vae.config.scaling_factor
    print(
        f"pool of {len(pool.scenes)} encoded, latent scaling factor {scale:.4f}, "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    # What is left, less a minute for saving; at least a minute of diffusion training.
    remaining = None if budget is None else max(60.0, budget - (time.monotonic() - started) - 60)
    unet_steps, unet_s = train_diffusion(
        vae,
        text_encoder,
        unet,
        tokenizer,
        pool,
        args.unet_steps,
        remaining,
        DIFFUSION_LR if args.init is None else FINETUNE_LR,
    )

    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu")
    pipe.save_pretrained(args.out, safe_serialization=True)
    total_s = time.monotonic() - started
    info = {
        "name": NAME,
        "native_size": SIZE,
        "default_steps": 20,
        "default_guidance": 5.0,
        # What the engine may generate at (daemon/resolution.py): what the buckets cover.
        "sizes": {"low": SIZES.low, "high": SIZES.high, "multiple": SIZES.multiple},
        "backgrounds": list(BACKGROUNDS),  # what its ControlNet is scored on
        "training": {
            "init": None if args.init is None else str(args.init),
            "vae_steps": vae_steps,
            "vae_seconds": round(vae_s),
            "decoder_steps": decoder_steps,
            "decoder_seconds": round(decoder_s),
            "unet_steps": unet_steps,
            "unet_seconds": round(unet_s),
            "pool": len(pool.scenes),
            "total_seconds": round(total_s),
            "threads": args.threads,
        },
        "params": {"vae": params(vae), "text_encoder": params(text_encoder), "unet": params(unet)},
    }
    (args.out / "sdbridge.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} after {total_s / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
