"""Jobs on a Ray cluster: the engine behind `sdbridge serve --cluster ADDRESS`.

The ZeroMQ daemon stays the only front door (daemon.py): it admits, validates, queues fairly,
saves the PNG files and routes the events, exactly as without a cluster. Only the jobs run
elsewhere: each in one `Worker`, a Ray actor holding an `Engine` of its own on one GPU (or one
CPU core). `ClusterEngine.run` has the local engine's signature, so the daemon's worker threads,
one per cluster worker, run jobs the same way: the job's progress, previews and images come back
through a Ray streaming generator and reach the same callbacks; a cancel is sent to the worker,
whose engine stops at its next step.

Faults: a worker that dies mid-job (its process killed, its node lost) ends that job with an
`error` (it is not retried: its client saw it start and may already hold previews), and the pool
starts a replacement. When Ray itself is down (its GCS does not answer), jobs are refused with
an `error` at once and the daemon keeps answering. docs/cluster.md has the whole picture.

Imported only with `--cluster`, after `startup.ray_environment`: a local daemon never imports
Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import RayError

from ..wire.protocol import ErrorCode, GenerateRequest, ProtocolError
from .cache import model_name
from .controlnets import ControlNetRegistry, embedded_controlnets
from .engine import Engine, GeneratedImage, JobCancelled, PreviewCallback, ProgressCallback
from .images import job_memory_bytes
from .loras import LoraRegistry
from .models import ModelRegistry, describe
from .placement import Candidate, choose
from .presets import JobDefaults, job_defaults
from .startup import build_engine, build_registry, quiet_libraries

log = logging.getLogger(__name__)

# How long `ray.init` may take to join a cluster before the daemon gives up on it.
CONNECT_TIMEOUT_S = 60.0
# How long a new worker may take to start: a process, torch, and its first model from disk.
WORKER_START_TIMEOUT_S = 300.0
# How often the pool looks whether Ray still answers (its GCS accepts a connection), and how
# long a connection may take to open.
RAY_CHECK_S = 2.0
# How often a running job looks whether its client cancelled it.
CANCEL_POLL_S = 0.05


class ClusterError(Exception):
    """The cluster cannot serve: a sentence for the operator."""


@dataclass(frozen=True)
class ModelFacts:
    """What the front daemon needs to know of a model that a worker has loaded."""

    native_size: int
    defaults: JobDefaults


@dataclass(frozen=True)
class WorkerState:
    """A worker's report of itself, sent when it starts and with each job's end."""

    host: str
    device: str  # a torch device type: cuda, cpu
    dtype: str  # a torch dtype's name: float16, float32
    memory_bytes: int  # what a job runs in (`images.job_memory_bytes`)
    loaded: dict[str, ModelFacts]  # least recently used first


@dataclass(frozen=True)
class Finished:
    """A job's last item from its worker: its images, or why there are none (neither: it was
    cancelled), and the worker's state after it."""

    state: WorkerState
    images: list[GeneratedImage] | None = None
    refused: tuple[str, str, str | None] | None = None  # a ProtocolError's code, message, field
    failure: str | None = None  # an unexpected exception, as text


class WorkerFailed(Exception):
    """A job failed on its worker with an unexpected exception (the daemon reports `internal`)."""


class Worker:
    """A Ray actor: one engine on the device Ray gave it, running one job at a time. Two calls
    run at once (`max_concurrency=2`), so that `cancel` reaches a job that is running."""

    def __init__(self, settings: Any, model: str) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s sdbridge worker: %(message)s")
        quiet_libraries()
        self.engine = build_engine(settings, model)
        self._cancelled: str | None = None  # the token of the job last cancelled

    def state(self) -> WorkerState:
        models = self.engine.models
        loaded = {
            name: ModelFacts(resident.native_size, resident.defaults)
            for name in models.loaded_names()
            if (resident := models.resident(name)) is not None
        }
        return WorkerState(
            host=socket.gethostname(),
            device=self.engine.device.type,
            dtype=str(self.engine.dtype).removeprefix("torch."),
            memory_bytes=job_memory_bytes(self.engine.device),
            loaded=loaded,
        )

    def cancel(self, token: str) -> None:
        """Stop the job `token` at its next step (it may not have started yet)."""
        self._cancelled = token

    def run(self, token: str, request: GenerateRequest, max_pixels: int | None) -> Iterator[list]:
        """A streaming generator: lists of events (`("progress", step, total)`, `("preview",
        step, total, image)`, `("loading", model)`), all that is ready at each yield, the last
        one ending with `Finished`."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = threading.Thread(target=self._job, args=(token, request, max_pixels, events.put))
        job.start()
        while True:
            batch = [events.get()]
            while not events.empty():
                batch.append(events.get())
            yield batch
            if isinstance(batch[-1], Finished):
                job.join()
                return

    def _job(
        self,
        token: str,
        request: GenerateRequest,
        max_pixels: int | None,
        put: Callable[[Any], None],
    ) -> None:
        try:
            # The front daemon's folders were rescanned for this name; this worker's not yet.
            engine = self.engine
            if (
                (request.model and engine.models.registry.get(request.model) is None)
                or any(engine.loras.get(lora.name) is None for lora in request.loras)
                or any(
                    c.model is not None and engine.controlnets.get(c.model) is None
                    for c in request.control
                )
            ):
                self.engine.rescan()
            images = self.engine.run(
                request,
                lambda step, total: put(("progress", step, total)),
                lambda step, total, image: put(("preview", step, total, image)),
                lambda: self._cancelled == token,
                lambda model: put(("loading", model)),
                max_pixels=max_pixels,
            )
            put(Finished(self.state(), images=images))
        except JobCancelled:
            put(Finished(self.state()))
        except ProtocolError as error:
            put(Finished(self.state(), refused=(error.code, error.message, error.field)))
        except Exception as exc:  # the worker outlives any failure inside a pipeline
            log.exception("a job failed")
            put(Finished(self.state(), failure=str(exc)))


STARTING, IDLE, BUSY, DOWN = "starting", "idle", "busy", "down"


@dataclass(eq=False)
class Slot:
    """One place in the pool, held by a worker, or waiting for one."""

    index: int
    status: str = STARTING
    actor: Any = None
    state: WorkerState | None = None  # its last report
    idle_since: float = 0.0
    problem: str = ""  # why it is down


class WorkerPool:
    """A fixed number of workers; each one that dies is replaced. `acquire` hands out an idle
    one (placement.py chooses which), `release` takes it back.

    A watchdog looks every few seconds whether the cluster's GCS still answers. When it does not,
    Ray is gone for this daemon (a driver rejoins a restarted head only with Ray's GCS fault
    tolerance): every job is refused with that reason at once, and Ray is shut down here, whose
    threads would otherwise poll the dead GCS flat out."""

    def __init__(self, settings: Any, model: str, size: int, gpus: bool) -> None:
        self.settings = settings
        self.model = model
        self.slots = [Slot(index) for index in range(size)]
        # A GPU worker's one CPU is Ray's default for actors and need not be reserved; a CPU
        # worker takes one core, and Ray gives its torch that many threads. Ray runs its
        # workers at nice 15; a job is this machine's work, as in a local daemon.
        self._actor = ray.remote(Worker).options(
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
            max_concurrency=2,
            max_restarts=0,
            runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
        )
        self._lock = threading.Condition()
        self._gcs = ray.get_runtime_context().gcs_address
        self.gone: str | None = None  # why Ray is gone, once it is
        self._stopping = threading.Event()

    @property
    def size(self) -> int:
        return len(self.slots)

    def start(self) -> None:
        """Start every worker and wait for all; ClusterError if one does not start."""
        threading.Thread(target=self._watch, name="sdbridge-ray-watch", daemon=True).start()
        with self._lock:
            for slot in self.slots:
                self._replace(slot)
            self._lock.wait_for(lambda: all(slot.status != STARTING for slot in self.slots))
        down = [slot for slot in self.slots if slot.status == DOWN]
        if down:
            raise ClusterError(f"worker {down[0].index} did not start: {down[0].problem}")

    def held(self) -> list[str]:
        """Every model some live worker holds."""
        with self._lock:
            return list(dict.fromkeys(name for state in self._live_states() for name in state))

    def memory_bytes(self) -> int:
        """What a job runs in on the smallest worker: the limits must fit any of them."""
        with self._lock:
            return min(slot.state.memory_bytes for slot in self.slots if slot.state is not None)

    def acquire(self, model: str) -> Slot:
        """An idle worker for a job on `model`, waiting for one that is starting. A
        ProtocolError when none is left: Ray is gone, or a replacement failed."""
        retried = False
        with self._lock:
            while True:
                idle = [slot for slot in self.slots if slot.status == IDLE]
                if idle:
                    holders = Counter(name for state in self._live_states() for name in state)
                    candidates = [
                        Candidate(slot.index, tuple(slot.state.loaded), slot.idle_since)
                        for slot in idle
                        if slot.state is not None
                    ]
                    slot = self.slots[choose(candidates, model, holders).index]
                    slot.status = BUSY
                    return slot
                if not any(slot.status == STARTING for slot in self.slots):
                    # Every worker not busy is down: start them once more, unless Ray is gone.
                    down = next(slot for slot in self.slots if slot.status == DOWN)
                    if retried or self.gone:
                        raise ProtocolError(
                            ErrorCode.INTERNAL,
                            f"no cluster worker can take the job: {self.gone or down.problem}",
                        )
                    for slot in self.slots:
                        if slot.status == DOWN:
                            self._replace(slot)
                    retried = True
                self._lock.wait(RAY_CHECK_S)

    def release(self, slot: Slot, state: WorkerState) -> None:
        with self._lock:
            slot.state, slot.status, slot.idle_since = state, IDLE, time.monotonic()
            self._lock.notify_all()

    def lost(self, slot: Slot, exc: RayError) -> str:
        """The worker in `slot` died: start another in its place. Returns what happened, in a
        few words: a worker lost, or Ray itself."""
        if self.gone is None and not self._ray_answers():
            self._ray_gone()
        problem = self.gone or _reason(exc)
        log.warning("cluster worker %d lost: %s", slot.index, problem)
        with self._lock:
            slot.problem = problem
            self._replace(slot)
        return problem

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            if self.gone is not None:
                return  # Ray is shut down already
            for slot in self.slots:
                if slot.actor is not None:
                    with contextlib.suppress(RayError):  # gone with its node
                        ray.kill(slot.actor, no_restart=True)
        ray.shutdown()

    def _live_states(self) -> Iterator[dict[str, ModelFacts]]:
        for slot in self.slots:
            if slot.status in (IDLE, BUSY) and slot.state is not None:
                yield slot.state.loaded

    def _replace(self, slot: Slot) -> None:
        """Start a worker for `slot` on a thread of its own (under the lock)."""
        old, slot.actor = slot.actor, None
        if self.gone is not None:
            slot.status, slot.problem = DOWN, self.gone
            return
        slot.status = STARTING
        threading.Thread(
            target=self._start, args=(slot, old), name=f"sdbridge-start-{slot.index}", daemon=True
        ).start()

    def _start(self, slot: Slot, old: Any) -> None:
        actor, state, problem = None, None, ""
        try:
            if old is not None:
                with contextlib.suppress(RayError):  # gone with its node
                    ray.kill(old, no_restart=True)
            actor = self._actor.remote(self.settings, self.model)
            state, problem = self._wait_ready(actor)
        except RayError as exc:  # Ray went meanwhile
            problem = self.gone or _reason(exc)
        with self._lock:
            if state is None:
                log.warning("cluster worker %d did not start: %s", slot.index, problem)
                slot.status, slot.problem = DOWN, problem
            else:
                log.info("cluster worker %d ready on %s (%s)", slot.index, state.host, state.device)
                slot.actor, slot.state, slot.status = actor, state, IDLE
                slot.idle_since = time.monotonic()
            self._lock.notify_all()

    def _wait_ready(self, actor: Any) -> tuple[WorkerState | None, str]:
        """The new worker's state, or None and why it did not start."""
        ready = actor.state.remote()
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not ray.wait([ready], timeout=RAY_CHECK_S)[0]:
            if self.gone is not None:
                return None, self.gone
            if time.monotonic() > deadline:
                problem = (
                    f"not ready in {WORKER_START_TIMEOUT_S:.0f} s: does the cluster have "
                    "the GPUs or CPUs free?"
                )
                break
        else:
            try:
                return ray.get(ready), ""
            except RayError as exc:  # its model did not load, its process died
                problem = _reason(exc)
        with contextlib.suppress(RayError):  # dead already
            ray.kill(actor, no_restart=True)
        return None, problem

    def _watch(self) -> None:
        while not self._stopping.wait(RAY_CHECK_S):
            if not self._ray_answers():
                self._ray_gone()
                return

    def _ray_gone(self) -> None:
        with self._lock:
            if self.gone is not None:
                return
            self.gone = (
                f"the Ray cluster does not answer at {self._gcs}: it is down; restart the "
                "daemon once it is back"
            )
            log.error("%s: refusing jobs", self.gone)
            for slot in self.slots:
                if slot.status != BUSY:  # a busy one's job ends in an error of its own
                    slot.status, slot.problem, slot.actor = DOWN, self.gone, None
            self._lock.notify_all()
        threading.Thread(target=ray.shutdown, name="sdbridge-ray-shutdown", daemon=True).start()

    def _ray_answers(self) -> bool:
        """Whether the cluster's GCS accepts a connection: a dead head refuses at once, where a
        Ray call would wait for it."""
        return _unreachable(self._gcs) is None


class ClusterModels:
    """What the daemon's socket thread asks of a `ModelCache` (listings, defaults, native sizes),
    answered from the workers' reports: the front daemon loads no model itself."""

    def __init__(
        self, registry: ModelRegistry, model_settings: dict, pool: WorkerPool, model: str
    ) -> None:
        first = pool.slots[0].state
        assert first is not None  # the pool has started
        self.registry = registry
        self.model_settings = model_settings
        self.pool = pool
        self.device = torch.device(first.device)
        self.dtype = getattr(torch, first.dtype)
        self._facts: dict[str, ModelFacts] = dict(first.loaded)
        self._active = model  # the most recently used: a job without `model` gets it
        self._native_size = self._facts[model].native_size

    @property
    def model(self) -> str:
        return self._active

    @property
    def native_size(self) -> int:
        """The active model's; the previous one's until a worker has loaded it."""
        facts = self._facts.get(self._active)
        return facts.native_size if facts else self._native_size

    def use(self, name: str) -> None:
        """A job on `name` is starting: it becomes the most recently used."""
        self._native_size, self._active = self.native_size, name

    def learn(self, state: WorkerState) -> None:
        self._facts = {**self._facts, **state.loaded}  # replaced whole: readers on other threads

    def loaded_names(self) -> list[str]:
        return self.pool.held()

    def resident(self, name: str) -> ModelFacts | None:
        return self._facts.get(name) if name in self.pool.held() else None

    def defaults(self, name: str) -> JobDefaults:
        facts = self._facts.get(name)
        if facts is not None:
            return facts.defaults
        entry = self.registry.get(name)
        scheduler = entry.scheduler if entry is not None else ""
        return job_defaults(name, scheduler, self.model_settings.get(name))


class ClusterEngine(Engine):
    """The engine the daemon sees: checks and listings as the local one (from `ClusterModels`),
    jobs run on the pool's workers."""

    def __init__(
        self,
        pool: WorkerPool,
        models: ClusterModels,
        loras: LoraRegistry,
        controlnets: ControlNetRegistry,
    ) -> None:
        super().__init__(models, loras, controlnets)  # type: ignore[arg-type]  # as a ModelCache
        self.pool = pool
        self.cluster_models = models  # `self.models`, with what only the cluster has

    def run(
        self,
        request: GenerateRequest,
        on_progress: ProgressCallback,
        on_preview: PreviewCallback,
        should_cancel: Callable[[], bool],
        on_loading: Callable[[str], None] | None = None,
        max_pixels: int | None = None,
    ) -> list[GeneratedImage]:
        model = request.model or self.model
        self.cluster_models.use(model)
        slot = self.pool.acquire(model)
        try:
            finished = self._follow(
                slot,
                dataclasses.replace(request, model=model),
                {"progress": on_progress, "preview": on_preview, "loading": on_loading},
                should_cancel,
                max_pixels,
            )
        except RayError as exc:
            log.warning("cluster worker %d lost mid-job: %s", slot.index, exc)
            problem = self.pool.lost(slot, exc)
            raise ProtocolError(
                ErrorCode.INTERNAL,
                f"the cluster worker running this job was lost ({problem}); "
                "the job did not finish: submit it again",
            ) from exc
        self.pool.release(slot, finished.state)
        self.cluster_models.learn(finished.state)
        if finished.images is not None:
            return finished.images
        if finished.refused is not None:
            raise ProtocolError(*finished.refused)
        if finished.failure is not None:
            raise WorkerFailed(finished.failure)
        raise JobCancelled

    def _follow(
        self,
        slot: Slot,
        request: GenerateRequest,
        callbacks: dict[str, Callable[..., None] | None],
        should_cancel: Callable[[], bool],
        max_pixels: int | None,
    ) -> Finished:
        """Stream the job's events from its worker into the callbacks, up to its end."""
        token = uuid.uuid4().hex
        stream = slot.actor.run.options(num_returns="streaming").remote(token, request, max_pixels)
        cancel_sent = False
        while True:
            if not cancel_sent and should_cancel():
                slot.actor.cancel.remote(token)
                cancel_sent = True
            if not ray.wait([stream], timeout=CANCEL_POLL_S)[0]:
                continue
            for item in ray.get(next(stream)):
                if isinstance(item, Finished):
                    return item
                callback = callbacks[item[0]]
                if callback is not None:
                    callback(*item[1:])

    @property
    def memory_bytes(self) -> int:
        return self.pool.memory_bytes()

    def close(self) -> None:
        self.pool.shutdown()


def start_cluster(settings: Any, model: str) -> ClusterEngine:
    """Join (or start) the cluster in `settings.cluster` and start its workers, each serving
    `model` first. ClusterError says why not."""
    address = settings.cluster
    if address.startswith("ray://"):
        # Ray Client cannot stream an actor's results (num_returns="streaming").
        raise ClusterError(
            f"--cluster {address}: Ray Client (ray://) cannot stream a job's progress; run the "
            "daemon on a node of the cluster and give `auto` or the head's HOST:PORT "
            "(docs/cluster.md)"
        )
    if settings.workers < 0:
        raise ClusterError("--workers must be 0 (one per GPU) or more")
    name = model  # what it is listed under; each worker resolves `model` as given
    try:  # before joining: a wrong path is the operator's to fix at once
        registry = build_registry(settings)
        if registry.get(model) is None:  # a folder, file or hub id: as `ModelCache` lists it
            name = model_name(model)
            registry.add(describe(model, name, settings.model_config, settings.allow_pickle))
    except (ValueError, OSError) as exc:
        raise ClusterError(f"cannot load model {model!r}: {exc}") from exc
    if address not in ("local", "auto"):
        problem = _unreachable(address)
        if problem is not None:
            raise ClusterError(f"nothing answers at {address}: {problem}")
    _connect(address)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    size = settings.workers or max(gpus, 1)
    if size > (gpus or cpus):
        kind = "GPU" if gpus else "CPU"
        raise ClusterError(
            f"the cluster has {gpus or cpus} {kind}s and {size} workers need one each; "
            "lower --workers or add nodes"
        )
    pool = WorkerPool(settings, model, size, gpus > 0)
    pool.start()
    models = ClusterModels(registry, settings.models, pool, name)
    return ClusterEngine(
        pool,
        models,
        LoraRegistry(settings.loras_dir),
        ControlNetRegistry(settings.controlnets_dir, embedded_controlnets()),
    )


def _connect(address: str) -> None:
    """`ray.init` for `address`. Joining is bounded: a head that does not answer makes it wait
    for ever. Starting one (`local`) runs on this thread: Ray's processes die with the thread
    that started them."""
    if address == "local":
        try:
            ray.init(
                address="local",  # a new instance, even where another runs
                namespace="sdbridge",
                logging_level=logging.WARNING,
                include_dashboard=False,
            )
        except Exception as exc:
            raise ClusterError(f"cannot start Ray on this machine: {_reason(exc)}") from exc
        return
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=address, namespace="sdbridge", logging_level=logging.WARNING)
        except Exception as exc:
            failure.append(exc)

    joining = threading.Thread(target=join, name="sdbridge-ray-init", daemon=True)
    joining.start()
    joining.join(CONNECT_TIMEOUT_S)
    if joining.is_alive():
        raise ClusterError(f"no answer from the Ray cluster at {address} in {CONNECT_TIMEOUT_S} s")
    if failure:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {_reason(failure[0])}")


def _unreachable(address: str) -> str | None:
    """Why a TCP connection to HOST:PORT fails, or None when it opens."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CHECK_S).close()
    except (OSError, ValueError) as exc:
        return str(exc) if isinstance(exc, ValueError) else (exc.strerror or str(exc))
    return None


def _reason(exc: BaseException) -> str:
    """The line of a Ray exception (they run to pages) that says what happened: its first, or
    for a worker that failed to start, its own exception's, which ends the text."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if getattr(exc, "actor_init_failed", False) else lines[0]
