"""The Ray collector: episodes spread over worker processes, one simulation each.

libsumo runs one simulation per process, so collecting in parallel takes
processes. Each worker is a Ray actor that builds its own environment and
teacher from picklable specs (the scenario, the environment settings and the
teacher's name or checkpoint path) and keeps them from round to round. The
learner stays in the driver: every ``collect`` sends the weights of the
behaviour's network (``student_state``: the student's for DAgger, the
Q-network's or the policy's for RL) to the workers once, through Ray's object
store.

One task is one episode. Episodes come back in the order of their seeds, and
an episode's teacher-or-student draws depend only on its round, its seed and
the collection's key (:func:`marlkd.rollout.local.episode_rng`), so the data
is the same with any number of workers, and the same as
:class:`~marlkd.rollout.local.LocalCollector` gives.

A worker that fails (its simulation raises, or its process dies) is replaced
and its episode runs again from the start, up to ``max_attempts`` times in
all; a :class:`~marlkd.errors.UserError` (bad files or settings) fails the
collection at once, since running it again would fail the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from marlkd.distill.dataset import Transitions
from marlkd.envs.traffic.env import TrafficEnvConfig
from marlkd.envs.traffic.scenarios import Scenario
from marlkd.errors import UserError
from marlkd.rollout.batching import AgentBatcher
from marlkd.rollout.local import LocalCollector, check_request, episode_key
from marlkd.teachers.base import Teacher

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20
"""Object store of a Ray instance the collector starts: an episode of grid4x4
returns 1.3 MB of samples, fetched as episodes end."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds its simulation and teacher from; all picklable.

    Attributes:
        scenario: the network and demand (built-in scenarios regenerate their
            files on a node that lacks them; a user's files must be at the
            same path on every node).
        env: the environment settings.
        teacher: a rule-based controller's name or a checkpoint's path; None
            for collections without labels.
        batcher: agent names and padded sizes of the dataset.
        scratch: the folder under which each worker's SUMO writes its outputs;
            the driver removes it at the end, with the outputs of workers that
            died before removing their own.
        wrap: applied to each worker's environment, as to the driver's (for
            example the neighbourhood views of a central teacher); None for
            the environment itself.
    """

    scenario: Scenario
    env: TrafficEnvConfig
    teacher: str | None
    batcher: AgentBatcher
    scratch: str
    wrap: Callable | None = None


class CollectorWorker:
    """One simulation and its teacher in a worker process; run as a Ray actor.

    The simulation is built on the first call, so a worker that fails to
    build it reports the error through that call, like any other.
    """

    def __init__(self):
        self.collector: LocalCollector | None = None
        self._output: Path | None = None
        self._policy_id: str | None = None
        self._policy: Teacher | None = None

    def setup(self, spec: WorkerSpec) -> int:
        """Build the simulation and teacher if not yet done; the process id."""
        if self.collector is None:
            import torch

            from marlkd.envs.traffic.env import TrafficSignalEnv
            from marlkd.teachers.registry import make_teacher

            torch.set_num_threads(1)  # one core per worker; the networks are tiny
            self._output = Path(spec.scratch) / f"worker-{os.getpid()}"
            env = TrafficSignalEnv(spec.scenario, spec.env, output_dir=self._output)
            if spec.wrap is not None:
                env = spec.wrap(env)
            teacher = None if spec.teacher is None else make_teacher(spec.teacher, env)
            self.collector = LocalCollector(env, teacher, spec.batcher)
        return os.getpid()

    def episode(self, spec, behaviour: list, beta, seed, round_index, key, record):
        """Run one episode; its samples, network figures and timings.

        ``behaviour`` holds the reference of the behaviour payload unresolved,
        so a worker deserialises the weights once per collection, not once per
        episode. ``record`` holds ``collect``'s keyword arguments ``label``,
        ``rl`` and ``state``.
        """
        self.setup(spec)
        policy = self._behaviour(behaviour[0])
        data, figures = self.collector.episode(
            policy, beta, seed, round_index, key, **record
        )
        return data, figures, self.collector.last_timing

    def close(self) -> None:
        if self.collector is not None:
            self.collector.env.close()
            self.collector = None
            shutil.rmtree(self._output, ignore_errors=True)

    def _behaviour(self, ref) -> Teacher | None:
        if ref.hex() != self._policy_id:
            import ray

            from marlkd.students.checkpoint import load_student

            payload = ray.get(ref)
            if payload is None:
                self._policy = None
            elif payload[0] == "student":
                _, state, shell = payload
                self._policy = copy.copy(shell)
                self._policy.student = load_student(state)
            else:
                self._policy = payload[1]
            self._policy_id = ref.hex()
        return self._policy


class RayCollector:
    """Collects transitions on Ray actors, one episode per task.

    Same interface as :class:`~marlkd.rollout.local.LocalCollector`; call
    :meth:`close` (or use it as a context manager) to stop the workers.

    Args:
        scenario: the network and demand every worker simulates.
        env_config: the environment settings.
        teacher: a rule-based controller's name or a checkpoint's path; None
            for collections without labels.
        batcher: agent names and padded sizes of the dataset.
        workers: actors to start, one CPU each; 0 means one per CPU of the
            Ray cluster.
        address: a Ray cluster to join; None starts a local Ray with
            ``workers`` CPUs, unless this process already runs Ray.
        max_attempts: runs of one episode before the collection gives up.
        wrap: a picklable function applied to every worker's environment
            (see ``WorkerSpec.wrap``).

    Attributes:
        timings: per episode of the last ``collect``, the worker's timings
            (``episode_s``, ``sumo_s``, ``cpu_s``, ``decisions``), the
            driver's time from sending the task to holding its result
            (``task_s``) and the part spent fetching the result (``fetch_s``).
        replaced: workers replaced after a failure, since the start.
    """

    def __init__(
        self,
        scenario: Scenario,
        env_config: TrafficEnvConfig,
        teacher: str | None,
        batcher: AgentBatcher,
        *,
        workers: int = 0,
        address: str | None = None,
        max_attempts: int = 3,
        wrap: Callable | None = None,
    ):
        if env_config.gui:
            raise UserError(
                "env.gui shows one simulation on this machine's screen: collect "
                "without --workers/--ray-address to watch it"
            )
        if workers < 0 or max_attempts < 1:
            raise UserError("workers must be >= 0 and max_attempts >= 1")
        ray = import_ray()
        self._owns_ray = False
        self._workers: list = []
        self._scratch: str | None = None
        if not ray.is_initialized():
            _init_ray(ray, workers, address)
            self._owns_ray = True
        elif address:
            logger.warning(
                "Ray is already running in this process: collecting on it, not on %s",
                address,
            )
        free = int(ray.available_resources().get("CPU", 0))
        if workers == 0:
            workers = max(free, 1)
        elif workers > free:
            logger.warning(
                "%d workers asked for, but the Ray cluster has %d free CPUs: "
                "the others wait for a CPU to free up",
                workers,
                free,
            )

        self.batcher = batcher
        self.labels = teacher is not None
        self.max_attempts = max_attempts
        self.timings: list[dict] = []
        self.replaced = 0
        self._scratch = tempfile.mkdtemp(prefix="marlkd-ray-")
        self._spec = ray.put(
            WorkerSpec(
                scenario,
                env_config,
                None if teacher is None else _portable_teacher(teacher),
                batcher,
                self._scratch,
                wrap,
            )
        )
        self._actor = ray.remote(num_cpus=1, max_restarts=0)(CollectorWorker)
        self._workers = [self._actor.remote() for _ in range(workers)]
        # build every simulation now, so that bad settings fail here
        pids = start_or_close(
            ray, [w.setup.remote(self._spec) for w in self._workers], self.close
        )
        logger.info(
            "collecting on %d Ray workers (pids %s)",
            len(pids),
            ", ".join(map(str, pids)),
        )

    @property
    def workers(self) -> list:
        """The actor handles, in worker order."""
        return list(self._workers)

    def collect(
        self,
        behaviour: Teacher | None,
        beta: float,
        seeds: list[int],
        round_index: int = 0,
        rng=None,
        progress: bool = True,
        *,
        label: bool = True,
        rl: bool = False,
        state: bool = False,
    ) -> tuple[Transitions, list[dict]]:
        """Run one episode per seed on the workers; see ``LocalCollector.collect``.

        A behaviour acting through a marlkd student (``StudentPolicy``, or
        RL's exploring policies) travels as the student's weights; any other
        behaviour policy is pickled as it is.
        """
        ray = import_ray()
        check_request(self.labels, behaviour, beta, label)
        key = episode_key(rng)
        record = {"label": label, "rl": rl, "state": state}
        payload = ray.put(_behaviour_payload(behaviour, beta))
        todo = deque(enumerate(seeds))
        attempts = [0] * len(seeds)
        results: list = [None] * len(seeds)
        running: dict = {}  # task -> (worker, position, seed, sent at)
        idle = deque(range(len(self._workers)))
        bar = tqdm(
            total=len(seeds),
            desc=f"collect round {round_index}",
            leave=False,
            disable=None if progress else True,
        )
        try:
            while todo or running:
                while idle and todo:
                    w = idle.popleft()
                    position, seed = todo.popleft()
                    task = self._workers[w].episode.remote(
                        self._spec, [payload], beta, seed, round_index, key, record
                    )
                    running[task] = (w, position, seed, time.perf_counter())
                (task,), _ = ray.wait(list(running), num_returns=1)
                w, position, seed, sent = running.pop(task)
                idle.append(w)
                fetch = time.perf_counter()
                try:
                    data, figures, timing = ray.get(task)
                except ray.exceptions.RayError as exc:
                    self._failed(exc, w, seed, attempts, position)
                    todo.appendleft((position, seed))
                    continue
                done = time.perf_counter()
                timing = {**timing, "task_s": done - sent, "fetch_s": done - fetch}
                results[position] = (data, figures, timing)
                bar.update()
        finally:
            bar.close()

        self.timings = [timing for _, _, timing in results]
        data = Transitions.concat([data for data, _, _ in results])
        return data, [figures for _, figures, _ in results]

    def close(self) -> None:
        """Stop the workers (and the Ray instance this collector started)."""
        ray = import_ray()
        if self._workers:
            # let each worker close its simulation, then end the processes
            closing = [w.close.remote() for w in self._workers]
            ray.wait(closing, num_returns=len(closing), timeout=10)
            for w in self._workers:
                ray.kill(w, no_restart=True)
            self._workers = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> RayCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _failed(self, exc, w: int, seed: int, attempts: list, position: int) -> None:
        """Replace worker ``w`` after ``exc``, or raise when retrying is futile."""
        ray = import_ray()
        attempts[position] += 1
        reason = retry_reason(
            exc, attempts[position], self.max_attempts, f"the episode of seed {seed}"
        )
        logger.warning(
            "worker %d failed on the episode of seed %d (%s): replacing it and "
            "running the episode again",
            w,
            seed,
            reason,
        )
        ray.kill(self._workers[w], no_restart=True)
        self._workers[w] = self._actor.remote()
        self.replaced += 1


def import_ray():
    """The ``ray`` module, or a UserError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise UserError(
            "collecting on workers needs Ray: install it with "
            "`pip install 'marlkd[ray]'`, or collect in this process "
            "(collect.workers=0, no --ray-address)"
        ) from exc
    return ray


def _wait_ready(ray, tasks: list, every_s: float = 60.0) -> list:
    """The tasks' results; says so in the log while some wait for a CPU."""
    pending = list(tasks)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        if pending:
            logger.warning(
                "%d of %d workers not started after %.0f s more: is a CPU free "
                "for each in the Ray cluster?",
                len(pending),
                len(tasks),
                every_s,
            )
    return ray.get(tasks)


def _init_ray(ray, workers: int, address: str | None) -> None:
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
        return
    if workers < 1:
        workers = os.cpu_count() or 1
    logger.info("starting a local Ray with %d CPUs", workers)
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        **quiet,
    )


def _behaviour_payload(behaviour: Teacher | None, beta: float):
    """What workers rebuild the behaviour policy from; None if it never acts."""
    from marlkd.students.base import Student
    from marlkd.students.checkpoint import student_state

    if behaviour is None or beta >= 1.0:
        return None
    student = getattr(behaviour, "student", None)
    if isinstance(student, Student):
        # the weights as tensors, the rest of the policy (batcher, epsilon) as is
        shell = copy.copy(behaviour)
        shell.student = None
        return ("student", student_state(student), shell)
    return ("policy", behaviour)


def _portable_teacher(teacher: str) -> str:
    """A checkpoint's absolute path, so workers in other folders find it."""
    from marlkd.teachers.registry import CONTROLLERS

    if teacher in CONTROLLERS or not Path(teacher).exists():
        return teacher
    return str(Path(teacher).resolve())


def start_or_close(ray, tasks: list, close) -> list:
    """The results of the workers' set-up ``tasks``; ``close`` them if one fails.

    Raises:
        UserError: a worker refused the settings (raised there, passed on).
    """
    try:
        return _wait_ready(ray, tasks)
    except ray.exceptions.RayError as exc:
        close()
        cause = _cause(exc)
        if isinstance(cause, UserError):
            raise cause from exc
        raise


def retry_reason(exc: BaseException, attempts: int, max_attempts: int, what: str):
    """Why a worker failed at ``what``, in one line, when a fresh one may not.

    Raises:
        UserError: the input is at fault; a fresh worker would fail the same.
        RuntimeError: ``what`` failed ``max_attempts`` times already.
    """
    cause = _cause(exc)
    if isinstance(cause, UserError):
        raise cause from exc
    reason = _first_line(cause)
    if attempts >= max_attempts:
        raise RuntimeError(
            f"{what} failed {attempts} times on fresh workers, last with: {reason}"
        ) from exc
    return reason


def _cause(exc: BaseException) -> BaseException:
    """The exception a task raised, or Ray's own error when the worker died."""
    return getattr(exc, "cause", None) or exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
