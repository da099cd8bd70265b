"""`sdbridge`: serve the daemon, or talk to a running one."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .editor.session import JobView, parse_lora
from .wire import protocol

CLI_NAME = f"sdbridge-cli/{__version__}"


def _settings(args: argparse.Namespace) -> Any:
    """The effective settings for `serve` and `config`: flags over environment over file."""
    from .daemon.settings import load_settings, options

    names = [option.name for option in options()] + list(_LIMIT_NAMES)
    return load_settings(args.config, {name: getattr(args, name) for name in names}, os.environ)


def serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Idle OpenMP workers sleep rather than spin: on a small CPU a spinning pool takes the cores
    # from other programs, the editor included, between jobs (docs/benchmarks.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sdbridge: %(message)s")
    from . import tiny
    from .daemon.outputs import OutputFolder
    from .daemon.security import TokenError, check_listen, read_token
    from .daemon.settings import SettingsError

    try:  # before loading the model: a refusal should not take a minute to arrive
        settings = _settings(args)
        token = read_token(settings.token_file)
        check_listen(settings.listen, token)
    except (SettingsError, TokenError, ValueError) as exc:
        print(f"sdbridge: {exc}", file=sys.stderr)
        return 2
    outputs = OutputFolder(settings.output_dir)
    try:
        outputs.check_writable()
    except OSError as exc:
        reason = exc.strerror or exc
        print(
            f"sdbridge: cannot save images in {outputs.root} ({reason}); "
            "choose another folder with --output-dir",
            file=sys.stderr,
        )
        return 2
    model = settings.model or (tiny.NAME if tiny.is_present() else None)
    if model is None:
        print("sdbridge: no model given and the embedded default model is missing", file=sys.stderr)
        return 2
    # Heavy imports only here: client commands must start fast.
    from .daemon.daemon import Daemon
    from .daemon.images import job_memory_bytes
    from .daemon.startup import build_engine, quiet_libraries, ray_environment

    quiet_libraries()
    start = time.perf_counter()
    if settings.cluster:  # Ray is imported only here
        ray_environment(settings.cluster)
        from .daemon.cluster import ClusterError, start_cluster

        try:
            engine = start_cluster(settings, model)
        except ClusterError as exc:
            print(f"sdbridge: {exc}", file=sys.stderr)
            return 2
        memory, parallel_jobs = engine.memory_bytes, engine.pool.size
    else:
        try:
            engine = build_engine(settings, model)
        except (ValueError, OSError) as exc:
            print(f"sdbridge: cannot load model {model!r}: {exc}", file=sys.stderr)
            return 2
        memory, parallel_jobs = job_memory_bytes(engine.device), 1
    logging.info(
        "loaded %s on %s (%s) in %.1f s%s",
        engine.model,
        engine.device,
        str(engine.dtype).removeprefix("torch."),
        time.perf_counter() - start,
        f" on each of {parallel_jobs} cluster workers" if settings.cluster else "",
    )
    logging.info(
        "%d models (folder %s), %d LoRAs (folder %s), %d ControlNets (folder %s)",
        len(engine.models.registry.names()),
        settings.models_dir,
        len(engine.loras.entries()),
        settings.loras_dir,
        len(engine.controlnets.entries()),
        settings.controlnets_dir,
    )
    try:
        daemon = Daemon(
            engine,
            outputs,
            address=settings.listen,
            limits=settings.limits_for(memory),
            heartbeat_ms=args.heartbeat_ms,
            token=token,
            parallel_jobs=parallel_jobs,
        )
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint
        print(f"sdbridge: cannot listen on {settings.listen}: {exc}", file=sys.stderr)
        return 2
    logging.info("images go to %s", outputs.root)
    daemon.install_signal_handlers()
    daemon.serve_forever()
    if settings.cluster:
        engine.close()
    logging.info("stopped")
    return 0


_LIMIT_NAMES = tuple(protocol.Limits().to_dict())


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    """One option per limit (`--max-queue`, ...), defaults from `protocol.Limits`."""
    group = parser.add_argument_group("limits (reported by hello; see docs/protocol.md)")
    for name, default in protocol.Limits().to_dict().items():
        # None: not given, so that the config file's value stands.
        shown = "from the device's memory" if name in protocol.MEMORY_LIMITS else default
        group.add_argument(
            f"--{name.replace('_', '-')}", type=int, metavar="N", help=f"default {shown}"
        )


def show_config(args: argparse.Namespace) -> int:
    import psutil  # not torch: `config` answers at once, and the RAM is what a CPU daemon has

    from .daemon.settings import SettingsError

    try:
        print(_settings(args).render(psutil.virtual_memory().total))
    except SettingsError as exc:
        print(f"sdbridge: {exc}", file=sys.stderr)
        return 2
    return 0


def _progress_bar(view: JobView, started: float) -> str:
    width = 30
    filled = round(width * view.step / view.total)
    elapsed = time.perf_counter() - started
    return (
        f"\r[{'#' * filled}{'-' * (width - filled)}] step {view.step}/{view.total}"
        f"  {elapsed:5.1f}s  ETA {view.eta:5.1f}s"
    )


def _load_image(path: str) -> protocol.Image:
    from PIL import Image

    with Image.open(path) as image:
        rgba = image.convert("RGBA")
        return protocol.Image(rgba.width, rgba.height, rgba.tobytes())


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(count)]


def generate(args: argparse.Namespace) -> int:
    import numpy as np

    from .daemon.outputs import encode_png, write_atomically
    from .editor.config import session_key
    from .editor.control import parse_control
    from .editor.session import Phase, Session, Settings, request_fields

    # What is not given stays unset: the daemon fills in the model's defaults (few-step models...).
    settings = Settings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        model=args.model,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        strength=args.strength,
        seed=args.seed,
        num_images=args.batch,
        loras=tuple(parse_lora(spec) for spec in args.lora),
        refine_strength=args.refine,
    )
    if args.style:
        from .editor.styles import StyleError, load_styles

        try:
            styles = load_styles()
        except StyleError as exc:
            print(f"sdbridge: {exc}", file=sys.stderr)
            return 2
        if args.style not in styles:
            known = ", ".join(styles) or "none yet"
            print(f"sdbridge: no style {args.style!r} (styles: {known})", file=sys.stderr)
            return 2
        settings = styles[args.style].apply(settings)
    try:
        controls = [parse_control(spec) for spec in args.control]
    except ValueError as exc:
        print(f"sdbridge: {exc}", file=sys.stderr)
        return 2
    try:
        init = _load_image(args.init_image).to_dict() if args.init_image else None
        mask = _load_image(args.mask).to_dict() if args.mask else None
        control = [choice.entry(_load_image(path).to_dict()) for choice, path in controls]
    except OSError as exc:
        print(f"sdbridge: cannot read image: {exc}", file=sys.stderr)
        return 2
    fields = request_fields(
        settings, args.width, args.height, init, mask, args.exact_size, control=control
    )

    # The artist's session key: `sdbridge results` finds the images of a run cut short.
    with Session(args.address, client_name=CLI_NAME, session_key=session_key()) as session:
        if not session.client.wait_connected(args.wait):
            print(f"sdbridge: {session.client.state_message}", file=sys.stderr)
            return 1
        started = time.perf_counter()
        generation = session.submit(fields)
        said = ""
        try:
            for view in generation.views(timeout=args.timeout):
                if view.phase in (Phase.QUEUED, Phase.LOADING) and view.message != said:
                    said = view.message
                    if view.message != "Starting …":
                        print(view.message, file=sys.stderr)
                elif view.phase is Phase.RUNNING and view.total and not args.quiet:
                    print(_progress_bar(view, started), end="", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            generation.cancel()
            print("\nsdbridge: cancelled", file=sys.stderr)
            return 130
        except TimeoutError:
            generation.cancel()
            print(f"\nsdbridge: no result within {args.timeout:g} s", file=sys.stderr)
            return 1
    if not args.quiet:
        print(file=sys.stderr)
    result = view.result
    if view.phase is not Phase.FINISHED or result is None:
        # A terminal user reads the daemon's own words (the view's are for an editor's panel).
        failure = view.failure
        text = f"{failure.message} ({failure.code})" if failure else view.message
        print(f"sdbridge: {text}", file=sys.stderr)
        return 1
    output = Path(args.output)
    for image, path in zip(result.images, _output_paths(output, len(result.images)), strict=True):
        data, width, height = image.image["data"], image.image["width"], image.image["height"]
        rgba = np.frombuffer(data, np.uint8).reshape(height, width, 4)
        # The daemon's images are RGB (alpha 255); written like its own copy, parameters too.
        png = encode_png(rgba[..., :3], {"parameters": image.parameters}, compress=True)
        try:
            write_atomically(path, png)
        except OSError as exc:
            print(f"sdbridge: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        copy = f"saved by the daemon as {image.path}" if image.path else "no daemon copy"
        print(f"{path}  (seed {image.seed}, {copy})")
    if result.warning:
        print(f"sdbridge: {view.message}", file=sys.stderr)
    return 0


def results(args: argparse.Namespace) -> int:
    """Lists the daemon's saved results this user may see, newest first; `--save DIR` also
    writes their PNG files there (for a job whose `generate` was cut short)."""
    from .daemon.outputs import write_atomically
    from .editor.config import session_key
    from .editor.session import Session
    from .wire.client import ClientError

    with Session(args.address, client_name=CLI_NAME, session_key=session_key()) as session:
        if not session.client.wait_connected(args.wait):
            print(f"sdbridge: {session.client.state_message}", file=sys.stderr)
            return 1
        try:
            page = session.results(args.before, args.limit, images=args.save is not None)
        except ClientError as exc:
            print(f"sdbridge: {exc}", file=sys.stderr)
            return 1
    for entry in page.results:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
        print(f"{entry.number:>5}  {when}  {entry.label}")
        print(f"       {entry.path or 'not saved by the daemon'}")
        if args.save is None:
            continue
        if entry.image is None:
            print("       (its file is gone: moved or deleted)", file=sys.stderr)
            continue
        name = Path(entry.path).name if entry.path else f"{entry.number:05d}-{entry.seed}.png"
        target = Path(args.save) / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, entry.image["data"])
        except OSError as exc:
            print(f"sdbridge: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"       -> {target}")
    if not page.results:
        print("no results yet", file=sys.stderr)
    elif page.more:
        print(f"older ones: --before {page.results[-1].number}", file=sys.stderr)
    return 0


def _ask(args: argparse.Namespace, *requests: str) -> tuple[str, list[dict[str, Any]]] | None:
    """The daemon's address and its answers to `Client` requests (`hello`, `status`, `models`),
    or None after telling the user why not."""
    from .wire.client import Client, ClientError

    with Client(args.address, timeout=args.timeout) as client:
        if not client.wait_connected(args.wait):
            print(f"sdbridge: {client.state_message}", file=sys.stderr)
            return None
        try:
            return client.address, [getattr(client, request)() for request in requests]
        except ClientError as exc:
            print(f"sdbridge: {exc}", file=sys.stderr)
            return None


def models(args: argparse.Namespace) -> int:
    asked = _ask(args, "models")
    if asked is None:
        return 1
    _, [listing] = asked
    for entry in listing["models"]:
        loaded = "loaded" if entry["loaded"] else ""
        size = f"{entry['size_bytes'] / 2**30:.2f} GiB"
        print(f"{entry['name']:<40} {entry['family']:<8} {size:>10}  {loaded}")
    for entry in listing["loras"]:
        print(f"{entry['name']:<40} {'lora':<8} {entry['size_bytes'] / 2**20:>6.1f} MiB")
    for entry in listing.get("controlnets", []):  # a daemon before control lists none
        kind = f"control/{entry['family']}"
        print(f"{entry['name']:<40} {kind:<8} {entry['size_bytes'] / 2**20:>6.1f} MiB")
    return 0


def status(args: argparse.Namespace) -> int:
    asked = _ask(args, "hello", "status")
    if asked is None:
        return 1
    address, [hello, state] = asked
    print(f"daemon   sdbridge {hello['server']} at {address}")
    print(f"device   {state['device']} ({state['dtype']})")
    print(f"model    {state['model']} (native {hello['native_size'][0]} px)")
    running = state["running"]
    if running and running["total"] is None:
        print("running  starting (loading its model or planning its steps)")
    elif running:
        print(f"running  step {running['step']}/{running['total']}")
    print(f"queue    {len(state['queue'])} job(s)")
    return 0


def install_plugin(args: argparse.Namespace) -> int:
    from . import install

    try:
        lines = install.install(args.target, plugins_dir=args.plugins_dir)
    except (ValueError, OSError) as exc:
        print(f"sdbridge: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def package_plugin(args: argparse.Namespace) -> int:
    from . import install

    try:
        print(install.package(args.target, Path(args.output)))
    except (ValueError, OSError) as exc:
        print(f"sdbridge: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help=f"daemon address (default: ${protocol.ADDRESS_ENV} or {protocol.DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--wait", type=float, default=5.0, help="seconds to wait for the daemon to come up"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a job")


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (docs/models.md); every default is None so that an absent flag
    leaves the environment's or the config file's value in place."""
    from .daemon.settings import CONFIG_ENV, default_config_path, options

    parser.add_argument(
        "--config", help=f"TOML config file (default ${CONFIG_ENV} or {default_config_path()})"
    )
    for option in options():
        flag = f"--{option.name.replace('_', '-')}"
        text = option.help.replace("%", "%%")  # argparse formats help with `%`
        if option.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = int if option.kind is int else str
            parser.add_argument(flag, type=kind, choices=option.choices, help=text)
    _add_limit_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sdbridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    # No abbreviations: `--token SECRET` must not pass for `--token-file`, leaving it in `ps`.
    p = commands.add_parser("serve", help="start the daemon", allow_abbrev=False)
    _add_settings_options(p)
    p.add_argument("--heartbeat-ms", type=int, default=5000, help=argparse.SUPPRESS)
    p.set_defaults(run=serve)

    p = commands.add_parser(
        "config",
        help="print the effective daemon configuration and where each value came from",
        allow_abbrev=False,
    )
    _add_settings_options(p)
    p.set_defaults(run=show_config)

    p = commands.add_parser("generate", help="make images with a running daemon")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the model's)")
    p.add_argument("--model", help="a model name from `sdbridge models`")
    p.add_argument("--scheduler", help="a sampler by its A1111 name, e.g. 'DPM++ 2M Karras'")
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="repeatable"
    )
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="MODEL,IMAGE[,PREPROCESSOR[,STRENGTH[,START,END]]]",
        help="a ControlNet from `sdbridge models` steering by IMAGE (repeatable); MODEL auto: "
        "the daemon's first that fits the model; preprocessor none, scribble or canny",
    )
    p.add_argument(
        "--exact-size", action="store_true", help="generate at --width x --height, not native"
    )
    p.add_argument(
        "--refine", type=float, metavar="STRENGTH", help="second pass for large sizes (0.2-0.4)"
    )
    p.add_argument(
        "--style",
        help="a style preset by name: its prompt additions, and parameters for what is not given "
        "(the styles file: $SDBRIDGE_STYLES or ~/.config/sdbridge/styles.json)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1, help="number of images")
    p.add_argument("--init-image", help="image to start from (img2img)")
    p.add_argument("--strength", type=float, help="how much of the init image to repaint (0-1]")
    p.add_argument("--mask", help="inpainting mask: white = repaint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_client_options(p)
    p.set_defaults(run=generate)

    p = commands.add_parser(
        "results", help="list the daemon's saved results (yours; all on a loopback daemon)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=10,
        choices=range(1, protocol.MAX_RESULTS_PAGE + 1),
        metavar=f"1..{protocol.MAX_RESULTS_PAGE}",
        help="how many, newest first (default 10)",
    )
    p.add_argument("--before", type=int, metavar="NUMBER", help="only results older than this")
    p.add_argument("--save", metavar="DIR", help="also write their PNG files into DIR")
    _add_client_options(p)
    p.set_defaults(run=results)

    p = commands.add_parser("models", help="list the daemon's models and LoRAs")
    _add_client_options(p)
    p.set_defaults(run=models)

    p = commands.add_parser("status", help="show the daemon's device, model and queue")
    _add_client_options(p)
    p.set_defaults(run=status)

    from .install import TARGETS

    p = commands.add_parser("install", help="install an editor plugin for this user")
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--plugins-dir", type=Path, help="install here instead of the editor's folder")
    p.set_defaults(run=install_plugin)

    p = commands.add_parser("package", help="write an editor plugin as a zip to import")
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("-o", "--output", default=".", help="folder for the zip")
    p.set_defaults(run=package_plugin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
