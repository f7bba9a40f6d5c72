"""A centralized teacher: a large network that sees its neighbours too.

Following centralized-teacher, decentralized-student training (CTDS, Zhao et
al. 2022; PTDE, Chen et al. 2022), the teacher of each signal reads more than
the student will: its own observation and its neighbours' (or every agent's),
laid out by ``marlkd.envs.traffic.neighbours.NeighbourView``:

    [ own obs | neighbour 1 obs | ... | neighbour K obs | present (K) ]

It is trained by independent DQN with parameter sharing on those views
(``train_central_teacher``), then distilled into students that see only their
own intersection; the delay of the teacher against its student is the
teacher–student gap these papers report.

At decision time the teacher builds the views from the environment's global
``state()`` (``needs_state = True``), so it labels states for any collector.

Its checkpoint is a student checkpoint (``student_state``) of the network with
two more keys, which ``load_student`` ignores:

    observe   "neighbours" or "global"
    view      ``NeighbourView.to_dict()``: K, each agent's observation size and
              its neighbours, exactly as in training
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from marlkd.envs.traffic.neighbours import (
    DEFAULT_NEIGHBOURS,
    OBSERVE_MODES,
    NeighbourObservationEnv,
    NeighbourView,
    view_layout,
)
from marlkd.errors import UserError
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import make_student
from marlkd.students.checkpoint import (
    check_layout,
    load_student,
    read_checkpoint,
    student_state,
)
from marlkd.students.policy import StudentPolicy
from marlkd.teachers.base import Teacher, TeacherOutput
from marlkd.utils import atomic_write_bytes

logger = logging.getLogger(__name__)


class CentralTeacher(Teacher):
    """A network acting on every agent's neighbourhood view.

    Args:
        network: a student network whose layout is the view's (see
            ``NeighbourObservationEnv.layout``).
        view: how each agent's view is built from the global state.
        observe: "neighbours" or "global", recorded in checkpoints.
    """

    name = "central"
    needs_state = True

    def __init__(
        self, network: torch.nn.Module, view: NeighbourView, observe: str
    ) -> None:
        if observe not in OBSERVE_MODES:
            raise UserError(
                f"unknown observe mode '{observe}': choose one of "
                f"{', '.join(OBSERVE_MODES)}"
            )
        self.student = network  # the name distillation and evaluation look for
        self.view = view
        self.observe = observe
        layout = network.layout
        batcher = AgentBatcher(view.agents, view.obs_size, layout.max_actions)
        self._policy = StudentPolicy(network, batcher)
        self._warned = False

    @torch.no_grad()
    def act(
        self,
        observations: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        state: np.ndarray | None = None,
    ) -> TeacherOutput:
        names = list(observations)
        if state is not None:
            views = self.view.from_state(state, names)
        else:
            missing = self.view.missing(observations, names)
            if missing and not self._warned:
                # Only a caller that skips needs_state gets here, e.g. a
                # latency probe timing one agent alone.
                logger.warning(
                    "the central teacher got no global state and lacks the "
                    "observations of %s: it treats them as absent neighbours",
                    ", ".join(missing),
                )
                self._warned = True
            views = self.view.from_observations(observations, names)
        return self._policy.act(views, {n: masks[n] for n in names})

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write the network and its view to ``path`` atomically."""
        state = student_state(self.student)
        state["observe"] = self.observe
        state["view"] = self.view.to_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def from_checkpoint(cls, path: str | Path, env) -> CentralTeacher:
        """The teacher saved at ``path``, for the agents of ``env``.

        Raises:
            UserError: the file is no central teacher, or it was trained for
                other agents or observation sizes than ``env``'s.
        """
        path = Path(path)
        state = read_checkpoint(path)
        if not isinstance(state, Mapping) or state.get("observe") not in OBSERVE_MODES:
            raise UserError(
                f"{path} is not a central teacher checkpoint: pass the "
                "student.pt of a central train-teacher run"
            )
        try:
            view = NeighbourView.from_dict(state["view"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"the neighbourhood view stored in {path} is damaged ({exc!r}): "
                "train the central teacher again"
            ) from exc
        sizes = {a: env.specs[a].obs_size for a in env.possible_agents}
        if view.sizes != sizes or view.agents != list(env.possible_agents):
            raise UserError(
                f"the central teacher {path} was trained for agents "
                f"{view.agents} with observation sizes {list(view.sizes.values())}; "
                f"this scenario has {list(sizes)} with {list(sizes.values())}: "
                "pass the scenario it was trained on"
            )
        expected = view_layout(view, env.specs, env.config.max_green)
        network = load_student(state)
        check_layout(network.layout, expected)
        return cls(network, view, state["observe"])


def is_central_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a readable checkpoint written by ``CentralTeacher.save``."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        state = read_checkpoint(path)
    except UserError:
        return False
    return isinstance(state, Mapping) and state.get("observe") in OBSERVE_MODES


def train_central_teacher(
    env,
    config,
    *,
    observe: str = "neighbours",
    k: int = DEFAULT_NEIGHBOURS,
    kind: str = "mlp",
    hidden: tuple[int, ...] = (256, 256),
    shared: bool = True,
    agent_embedding: int = 16,
    writer=None,
    eval_seed: int = 9_000,
    progress: bool = True,
    workers: int = 0,
    ray_address: str | None = None,
    checkpoint: Path | None = None,
) -> tuple[CentralTeacher, list[dict]]:
    """Train a central teacher with DQN on ``env``'s neighbourhood views.

    Args:
        env: the traffic environment; it is wrapped, not closed.
        config: the ``RLConfig`` of the DQN run.
        observe: "neighbours" (own and up to ``k`` neighbours' observations)
            or "global" (every agent's).
        k: neighbour slots per agent.
        kind, hidden, shared, agent_embedding: the network; only "mlp" reads
            views, which have no per-phase features.
        writer: where ``rl/...`` metrics go.
        eval_seed: seed of the greedy evaluation episodes.
        workers, ray_address: where the training episodes run (see
            ``marlkd.rollout.make_collector``); each Ray worker builds the
            same views around its own simulation.
        checkpoint: where ``train_dqn`` keeps its training state; when it
            exists, training resumes from it.

    Returns:
        The trained teacher, and ``train_dqn``'s evaluation curve.

    Raises:
        UserError: ``checkpoint`` holds a state of another algorithm, or of a
            network of other sizes (another scenario, ``observe`` or ``k``).
    """
    from marlkd.rl.dqn import train_dqn
    from marlkd.rollout import make_collector

    if kind != "mlp":
        raise UserError(
            f"a central teacher cannot be a '{kind}' network: its input, the "
            "neighbours' observations, has no per-phase features; use mlp"
        )
    wrap = functools.partial(NeighbourObservationEnv, observe=observe, k=k)
    wrapped = wrap(env)
    layout = wrapped.layout()
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    torch.manual_seed(config.seed)
    network = make_student(
        kind,
        layout,
        hidden=tuple(hidden),
        shared=shared,
        agent_embedding=agent_embedding,
    )
    logger.info(
        "central teacher (%s, K=%d): views of %d entries, %d parameters",
        observe,
        wrapped.view.k,
        wrapped.view.obs_size,
        network.num_parameters(),
    )
    collector = make_collector(
        wrapped,
        None,
        batcher,
        teacher_spec=None,
        workers=workers,
        ray_address=ray_address,
        wrap=wrap,
    )
    try:
        curve = train_dqn(
            wrapped,
            network,
            config,
            batcher=batcher,
            collector=collector,
            writer=writer,
            eval_seed=eval_seed,
            checkpoint=checkpoint,
            progress=progress,
        )
    finally:
        collector.close()
    return CentralTeacher(network, wrapped.view, observe), curve
