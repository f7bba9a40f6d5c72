"""Students that learn together, trained on Ray actors.

Each actor holds some of the clients of
:func:`marlkd.distill.cooperative.learn_together` (client k on actor k mod the
number of actors), with their own samples, sent once through Ray's object
store. Every round the driver sends each client the parameters to start from
(the shared student of FedAvg, or the client's own student of the previous
round) and, for mutual distillation, the peers' logits on the shared states;
the actors train their clients one after another and send back the new
parameters (and logits). The driver averages or relays, as in process.

Since the driver holds every client's parameters after each round, an actor
that fails (its process dies, or training raises) is replaced, its clients
are built again and its part of the round runs again from the same start, up
to ``max_attempts`` times in all; a :class:`~marlkd.errors.UserError` fails
the run at once. Ray is imported only here, when asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.errors import UserError
from marlkd.rollout.ray_collector import (
    _init_ray,
    retry_reason,
    start_or_close,
)

logger = logging.getLogger(__name__)


class LearnerWorker:
    """Some clients and their samples in a worker process; run as a Ray actor."""

    def __init__(self):
        self.clients: dict = {}

    def setup(self, indices, parts, student, loss, config, shared) -> int:
        """Build the clients ``indices`` from their parts; the process id.

        ``parts`` holds the references of the clients' samples unresolved, so
        that each actor fetches only its own.
        """
        import os

        import ray
        import torch

        from marlkd.distill.cooperative import Client

        torch.set_num_threads(1)  # one core per worker; the networks are tiny
        for k, ref in zip(indices, parts, strict=True):
            self.clients[k] = Client(k, student, ray.get(ref), loss, config, shared)
        return os.getpid()

    def train_round(self, round_index: int, states: dict, peers) -> dict:
        """Each client's ``train_round`` from its state in ``states``."""
        return {
            k: self.clients[k].train_round(round_index, state, peers)
            for k, state in states.items()
        }


class RayClients:
    """The clients of ``learn_together`` on Ray actors; call :meth:`close`.

    Args:
        student: the ``student_state`` every client is built from.
        parts: each client's samples.
        loss: the distillation loss towards the teacher.
        config: the ``CooperativeConfig``.
        shared: the shared states of mutual distillation, or None.
        workers: actors to start, one CPU each; 0 means one per free CPU of
            the Ray cluster. Never more than there are clients.
        address: a Ray cluster to join; None starts a local Ray with
            ``workers`` CPUs, unless this process already runs Ray.
        max_attempts: runs of one actor's part of a round before giving up.
        num_cpus: CPUs each actor reserves. 0 lets the actors run beside
            actors that hold the CPUs but wait meanwhile (a distillation run's
            rollout workers, between collections); with ``workers`` 0 there
            is then one actor per CPU of the cluster, not per free one.
    """

    def __init__(
        self,
        student: Mapping,
        parts: Sequence[Transitions],
        loss: DistillationLoss,
        config,
        shared: Mapping[str, np.ndarray] | None,
        *,
        workers: int = 0,
        address: str | None = None,
        max_attempts: int = 3,
        num_cpus: float = 1.0,
    ):
        if workers < 0 or max_attempts < 1 or num_cpus < 0:
            raise UserError("workers must be >= 0, max_attempts >= 1 and num_cpus >= 0")
        ray = import_ray()
        self._owns_ray = False
        self._actors: list = []
        if not ray.is_initialized():
            _init_ray(ray, workers, address)
            self._owns_ray = True
        elif address:
            logger.warning(
                "Ray is already running in this process: training on it, not on %s",
                address,
            )
        if workers == 0:
            cpus = ray.available_resources() if num_cpus else ray.cluster_resources()
            workers = max(int(cpus.get("CPU", 0)), 1)
        workers = min(workers, len(parts))

        self.max_attempts = max_attempts
        self.replaced = 0
        self._assigned = [list(range(w, len(parts), workers)) for w in range(workers)]
        self._parts = [ray.put(p) for p in parts]
        self._setup = (
            ray.put(dict(student)),
            ray.put(loss),
            ray.put(config),
            ray.put(None if shared is None else dict(shared)),
        )
        self._actor = ray.remote(num_cpus=num_cpus, max_restarts=0)(LearnerWorker)
        self._actors = [self._actor.remote() for _ in range(workers)]
        pids = start_or_close(ray, [self._build(w) for w in range(workers)], self.close)
        logger.info(
            "training %d clients on %d Ray workers (pids %s)",
            len(parts),
            workers,
            ", ".join(map(str, pids)),
        )

    def train_round(self, round_index: int, states: list, peers) -> list[tuple]:
        """Every client's ``train_round``, in client order."""
        ray = import_ray()
        peers_ref = ray.put(peers)
        attempts = [0] * len(self._actors)
        tasks = {self._send(w, round_index, states, peers_ref): w for w in self._todo()}
        results: dict = {}
        while tasks:
            (task,), _ = ray.wait(list(tasks), num_returns=1)
            w = tasks.pop(task)
            try:
                results.update(ray.get(task))
            except ray.exceptions.RayError as exc:
                self._failed(exc, w, attempts)
                tasks[self._send(w, round_index, states, peers_ref)] = w
        return [results[k] for k in range(len(states))]

    def close(self) -> None:
        """Stop the actors (and the Ray instance these clients started)."""
        ray = import_ray()
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def _todo(self) -> list[int]:
        return [w for w, clients in enumerate(self._assigned) if clients]

    def _build(self, w: int):
        indices = self._assigned[w]
        return self._actors[w].setup.remote(
            indices, [self._parts[k] for k in indices], *self._setup
        )

    def _send(self, w: int, round_index: int, states: list, peers_ref):
        mine = {k: states[k] for k in self._assigned[w]}
        return self._actors[w].train_round.remote(round_index, mine, peers_ref)

    def _failed(self, exc, w: int, attempts: list[int]) -> None:
        """Replace actor ``w`` after ``exc``, or raise when retrying is futile."""
        ray = import_ray()
        attempts[w] += 1
        reason = retry_reason(
            exc, attempts[w], self.max_attempts, f"training clients {self._assigned[w]}"
        )
        logger.warning(
            "worker %d failed training clients %s (%s): replacing it and training "
            "them again from the round's start",
            w,
            self._assigned[w],
            reason,
        )
        ray.kill(self._actors[w], no_restart=True)
        self._actors[w] = self._actor.remote()
        self.replaced += 1
        ray.get(self._build(w))


def import_ray():
    """The ``ray`` module, or a UserError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise UserError(
            "training students on workers needs Ray: install it with "
            "`pip install 'marlkd[ray]'`, or train them in this process "
            "(workers=0, no Ray address)"
        ) from exc
    return ray
