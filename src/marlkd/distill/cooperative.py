"""Students that learn together: federated averaging and mutual distillation.

Several clients each hold a student and their own part of the teacher-labelled
data: the episodes of one rollout worker, or the samples of some signals of
the network. Each round every client trains its student on its own part for a
few epochs with a fresh AdamW, and then the clients combine what they learnt
in one of two ways.

``fedavg``: federated averaging (McMahan et al., 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data"). Every client starts the
round from the shared student; the driver replaces it by the average of the
clients' students, weighted by their sample counts n_k (n = sum_k n_k):

    w_{t+1} = sum_k (n_k / n) w_{t+1}^k

What travels: the shared parameters to the clients, each client's parameters
back. The data stays with its client.

``mutual``: mutual distillation (deep mutual learning; Zhang et al., 2018,
"Deep Mutual Learning"). Each client keeps its own student; its loss is the
distillation loss towards the teacher on its own samples plus a pull towards
its K - 1 peers' softened predictions:

    L_k = L_distill(z_k; teacher, own samples)
          + w T^2 / (K - 1) sum_{j != k} KL(softmax(z_j / T) || softmax(z_k / T))

The KL term is taken on a shared set of states, the observations (without the
teacher's labels) of every client, exchanged once at the start; a minibatch of
them as large as the teacher's is drawn at every step. The peers' logits z_j
are those of their students at the end of the previous round: each client
sends its logits on the shared states to the driver after every round, and the
driver relays them to the others. Round 0 has no KL term, since no peer has
learnt anything yet. Unlike Zhang et al., whose students exchange predictions
at every step, the peers' targets stay fixed for a round, as federated
distillation does to keep communication per round (Jeong et al., 2018).

The clients run in this process one after another (``workers=0``) or on Ray
actors (:class:`~marlkd.rollout.ray_learner.RayClients`), each actor training
its share of the clients; the driver only averages or relays. Each client's
minibatch orders depend only on its seed, the round and its index, so both
give the same students up to the order of floating-point sums, which is the
same here: in-process and Ray runs agree bit for bit on one machine.

After every round the driver writes its state (the round reached, each
client's parameters and, for ``mutual``, the logits to relay) atomically to
``checkpoint``; a run started again with the same checkpoint resumes after the
last round it finished and ends with the same students.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from marlkd.config import LearnTogether, TrainConfig
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss, kl_loss
from marlkd.errors import UserError
from marlkd.students.base import Student
from marlkd.students.checkpoint import load_student, student_state
from marlkd.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

METHODS = ("fedavg", "mutual")
CHECKPOINT_FORMAT = "marlkd.cooperative"


@dataclass
class CooperativeConfig(LearnTogether):
    """How the clients learn together.

    The fields and their help are those of the ``cooperate`` section of a
    run's configuration (:class:`~marlkd.config.LearnTogether`), with the
    method ``fedavg`` by default, and the local optimisation besides.

    Attributes:
        method: ``fedavg`` (parameter averaging) or ``mutual`` (mutual
            distillation).
        rounds: rounds of local training followed by combining.
        local_epochs: passes of each client over its own samples per round.
        mutual_weight: w, the weight of the KL term towards the peers.
        mutual_temperature: T of the KL term towards the peers.
        train: batch size, learning rate, weight decay and seed of the local
            training (``epochs``, ``val_fraction`` and ``patience`` are not
            used: every sample trains, for ``local_epochs`` per round).
    """

    method: str = "fedavg"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self.check(METHODS)

    @classmethod
    def of_run(cls, cooperate: LearnTogether, train: TrainConfig):
        """The settings of a run's ``cooperate`` section and its optimisation."""
        return cls(
            cooperate.method,
            cooperate.rounds,
            cooperate.local_epochs,
            cooperate.mutual_weight,
            cooperate.mutual_temperature,
            train,
        )


@dataclass
class CooperativeResult:
    """The students after the last round.

    Attributes:
        students: each client's student; for ``fedavg`` all are the shared one.
        history: per round, the clients' mean losses (``distill/train_loss``
            towards the teacher, ``distill/mutual_loss`` towards the peers)
            and the round's wall time (``timers/round_s``).
    """

    students: list[Student]
    history: list[dict] = field(default_factory=list)

    @property
    def shared(self) -> Student:
        """The shared student of ``fedavg`` (client 0's for ``mutual``)."""
        return self.students[0]


# ------------------------------------------------------------------ the terms
def mutual_loss(
    student_logits: torch.Tensor,
    peer_logits: Sequence[torch.Tensor],
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The pull of deep mutual learning towards the peers' predictions.

        loss = 1 / (K - 1) sum_j T^2 KL(softmax(z_j / T) || softmax(z_s / T))

    over the allowed actions, averaged over the batch; 0 with no peers. The
    peers' logits are targets: no gradient flows into them.

    Args:
        student_logits: (B, A) this client's logits.
        peer_logits: K - 1 tensors (B, A), the peers' logits on the same rows.
        mask: (B, A) bool, allowed actions.
        temperature: T > 0.
    """
    if not peer_logits:
        return student_logits.new_zeros(())
    terms = [
        kl_loss(student_logits, peer.detach(), mask, temperature)
        for peer in peer_logits
    ]
    return torch.stack(terms).mean()


def average_states(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts: FedAvg's aggregation.

    Floating-point entries are averaged in float64 and returned in their own
    dtype; other entries (counters) must agree and are copied.
    """
    if not states or len(states) != len(weights):
        raise ValueError("give one weight per state, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to 0: every client has no samples")
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            if any(not torch.equal(s[key], first) for s in states[1:]):
                raise ValueError(f"{key} differs between clients and is no float")
            out[key] = first.clone()
            continue
        mean = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            mean += (weight / total) * state[key].to(torch.float64)
        out[key] = mean.to(first.dtype)
    return out


# ---------------------------------------------------------------- one client
class Client:
    """One student and its own samples; trains locally, in any process.

    Everything it holds arrives as plain data (a ``student_state`` dict,
    Transitions, the loss module and settings), so a Ray actor builds it the
    same way as this process does.

    Args:
        index: the client's number k, part of its minibatch seeds.
        student: the ``student_state`` of the initial student.
        data: the client's own teacher-labelled samples.
        loss: the distillation loss towards the teacher.
        config: how the clients learn together.
        shared: the shared states (obs, agent, mask) of ``mutual``.
    """

    def __init__(
        self,
        index: int,
        student: Mapping,
        data: Transitions,
        loss: DistillationLoss,
        config: CooperativeConfig,
        shared: Mapping[str, np.ndarray] | None = None,
    ):
        self.index = index
        self.student = load_student(student)
        self.loss = loss
        self.config = config
        self.data = _tensors(data)
        self.shared = None
        if config.method == "mutual" and shared is None:
            raise ValueError("a client of mutual distillation needs the shared states")
        if shared is not None:
            self.shared = {
                "obs": _tensor(shared["obs"], np.float32),
                "agent": _tensor(shared["agent"], np.int64),
                "mask": _tensor(shared["mask"], bool),
            }

    def __len__(self) -> int:
        return len(self.data["agent"])

    def train_round(
        self,
        round_index: int,
        state: Mapping[str, torch.Tensor],
        peers: Sequence[np.ndarray] | None = None,
    ) -> tuple[dict, np.ndarray | None, dict]:
        """Train from ``state`` for ``local_epochs`` epochs.

        Args:
            round_index: the round, part of the minibatch seeds.
            state: the parameters to start from.
            peers: for ``mutual``, every client's logits on the shared states
                at the end of the previous round, this client's included (it
                is skipped); None in round 0.

        Returns:
            The new parameters, this client's logits on the shared states
            (``mutual`` only, else None) and its mean losses.
        """
        cfg, train = self.config, self.config.train
        self.student.load_state_dict(state)
        peer_logits = []
        if peers is not None and cfg.method == "mutual":
            peer_logits = [
                _tensor(p, np.float32) for j, p in enumerate(peers) if j != self.index
            ]
        optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=train.lr, weight_decay=train.weight_decay
        )
        generator = torch.Generator().manual_seed(
            _seed(train.seed, round_index, self.index)
        )

        n = len(self)
        teacher_sum, mutual_sum, steps = 0.0, 0.0, 0
        self.student.train()
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, train.batch_size):
                batch = {
                    k: v[order[start : start + train.batch_size]]
                    for k, v in self.data.items()
                }
                out = self.student(batch["obs"], batch["agent"], batch["mask"])
                loss, _ = self.loss(
                    out,
                    mask=batch["mask"],
                    teacher_scores=batch["teacher_scores"],
                    teacher_action=batch["teacher_action"],
                )
                teacher_sum += float(loss.detach())

                # the pull towards the peers, on a minibatch of shared states
                if peer_logits and cfg.mutual_weight > 0:
                    rows = torch.randint(
                        len(self.shared["agent"]),
                        (train.batch_size,),
                        generator=generator,
                    )
                    s = {k: v[rows] for k, v in self.shared.items()}
                    mine = self.student(s["obs"], s["agent"], s["mask"]).logits
                    pull = mutual_loss(
                        mine,
                        [p[rows] for p in peer_logits],
                        s["mask"],
                        cfg.mutual_temperature,
                    )
                    mutual_sum += float(pull.detach())
                    loss = loss + cfg.mutual_weight * pull

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1

        logits = self.predict() if cfg.method == "mutual" else None
        metrics = {
            "distill/train_loss": teacher_sum / max(steps, 1),
            "distill/mutual_loss": mutual_sum / max(steps, 1),
        }
        return _detached(self.student.state_dict()), logits, metrics

    @torch.no_grad()
    def predict(self) -> np.ndarray:
        """This student's logits on the shared states, float32 (N, A)."""
        self.student.eval()
        parts = []
        for i in range(0, len(self.shared["agent"]), 4096):
            s = {k: v[i : i + 4096] for k, v in self.shared.items()}
            parts.append(self.student(s["obs"], s["agent"], s["mask"]).logits)
        return torch.cat(parts).numpy()


class InProcessClients:
    """The clients in this process, trained one after another."""

    def __init__(self, clients: list[Client]):
        self.clients = clients

    def train_round(self, round_index: int, states: list, peers) -> list[tuple]:
        return [
            c.train_round(round_index, state, peers)
            for c, state in zip(self.clients, states, strict=True)
        ]

    def close(self) -> None:
        self.clients = []


# ------------------------------------------------------------------- driver
def learn_together(
    student: Student,
    parts: Sequence[Transitions],
    loss: DistillationLoss,
    config: CooperativeConfig,
    *,
    workers: int = 0,
    ray_address: str | None = None,
    worker_cpus: float = 1.0,
    checkpoint: Path | None = None,
    starts: Sequence[Student] | None = None,
    progress: bool = True,
) -> CooperativeResult:
    """Train one student per part of the data, combined every round.

    Args:
        student: the initial student; every client starts from a copy. It is
            not changed.
        parts: each client's own samples.
        loss: the distillation loss towards the teacher (without the feature
            term).
        config: the method, rounds, epochs and optimisation.
        workers: Ray actors to train the clients on; 0 with no address trains
            them in this process.
        ray_address: a Ray cluster to join.
        worker_cpus: CPUs each Ray actor reserves; 0 when the CPUs are held by
            actors that sit idle meanwhile, such as a run's rollout workers.
        checkpoint: where the state after each round is written; an existing
            file of the same setting is resumed.
        starts: for ``mutual``, each client's own student to start from (of
            ``student``'s kind and size), e.g. the clients of an earlier
            DAgger round; None starts every client from ``student``.
        progress: show a progress bar over rounds.

    Raises:
        UserError: no parts, an empty part, or a checkpoint of another setting.
        NotImplementedError: the feature term, whose projection would have to
            be averaged or exchanged too.
    """
    if not parts or any(len(p) == 0 for p in parts):
        raise UserError("every client needs samples: give non-empty parts")
    if loss.feature is not None:
        raise NotImplementedError(
            "learning together with the feature loss term: its projection is "
            "neither averaged nor exchanged; set loss weight feature to 0"
        )
    initial = student_state(student)
    shared = None
    if config.method == "mutual":
        shared = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ("obs", "agent", "mask")
        }
    sizes = [len(p) for p in parts]

    states = [initial["state_dict"]] * len(parts)
    if starts is not None:
        if config.method != "mutual" or len(starts) != len(parts):
            raise ValueError("starts: one student per part, and for mutual only")
        states = [student_state(s)["state_dict"] for s in starts]
    start, peers, history = 0, None, []
    if checkpoint is not None and Path(checkpoint).exists():
        start, states, peers, history = _load(Path(checkpoint), config, sizes)
        logger.info("learning together: resuming after round %d", start)

    if workers == 0 and not ray_address:
        runner = InProcessClients(
            [
                Client(k, initial, part, loss, config, shared)
                for k, part in enumerate(parts)
            ]
        )
    else:
        from marlkd.rollout.ray_learner import RayClients

        runner = RayClients(
            initial,
            parts,
            loss,
            config,
            shared,
            workers=workers,
            address=ray_address,
            num_cpus=worker_cpus,
        )

    try:
        bar = tqdm(
            range(start, config.rounds),
            desc=f"learn together ({config.method})",
            leave=False,
            disable=None if progress else True,
        )
        for r in bar:
            started = time.perf_counter()
            results = runner.train_round(r, states, peers)
            new_states = [state for state, _, _ in results]
            if config.method == "fedavg":
                states = [average_states(new_states, sizes)] * len(parts)
            else:
                states = new_states
                peers = [logits for _, logits, _ in results]
            row = {
                "round": r,
                "distill/train_loss": _mean(results, "distill/train_loss", sizes),
                "distill/mutual_loss": _mean(results, "distill/mutual_loss", sizes),
                "timers/round_s": time.perf_counter() - started,
            }
            history.append(row)
            logger.info(
                "round %d: distill/train_loss=%.4f distill/mutual_loss=%.4f",
                r,
                row["distill/train_loss"],
                row["distill/mutual_loss"],
            )
            bar.set_postfix(loss=f"{row['distill/train_loss']:.4f}")
            if checkpoint is not None:
                _save(Path(checkpoint), config, sizes, r + 1, states, peers, history)
        bar.close()
    finally:
        runner.close()

    students = []
    for state in states:
        s = load_student(initial)
        s.load_state_dict(state)
        students.append(s.eval())
    return CooperativeResult(students=students, history=history)


# -------------------------------------------------------------------- helpers
def _seed(seed: int, round_index: int, client: int) -> int:
    """The minibatch seed of one client's round: independent of where it runs."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0])


def _mean(results, key: str, sizes: list[int]) -> float:
    values = [metrics[key] for _, _, metrics in results]
    return float(np.average(values, weights=sizes))


def _detached(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _tensor(array, dtype) -> torch.Tensor:
    """A tensor of its own: arrays from Ray's object store are read-only."""
    return torch.from_numpy(np.array(array, dtype=dtype))


def _tensors(data: Transitions) -> dict[str, torch.Tensor]:
    return {
        "obs": _tensor(data.obs, np.float32),
        "agent": _tensor(data.agent, np.int64),
        "mask": _tensor(data.mask, bool),
        "teacher_scores": _tensor(data.teacher_scores, np.float32),
        "teacher_action": _tensor(data.teacher_action, np.int64),
    }


def _setting(config: CooperativeConfig, sizes: list[int]) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "method": config.method,
        "local_epochs": config.local_epochs,
        "mutual_weight": config.mutual_weight,
        "mutual_temperature": config.mutual_temperature,
        "train": {
            "batch_size": config.train.batch_size,
            "lr": config.train.lr,
            "weight_decay": config.train.weight_decay,
            "seed": config.train.seed,
        },
        "sizes": list(sizes),
    }


def _save(path, config, sizes, rounds_done, states, peers, history) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "setting": _setting(config, sizes),
        "rounds_done": rounds_done,
        "states": list(states[:1] if config.method == "fedavg" else states),
        "peers": None if peers is None else [_tensor(p, np.float32) for p in peers],
        "history": history,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load(path: Path, config: CooperativeConfig, sizes: list[int]):
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a checkpoint of students learning together: pass "
            "another path, or delete it to start over"
        )
    if state["setting"] != _setting(config, sizes):
        raise UserError(
            f"{path} was written by a run of other settings or data "
            f"({state['setting']}): delete it to start over, or resume with "
            "the settings it was written with"
        )
    states = state["states"]
    if config.method == "fedavg":
        states = states * len(sizes)
    peers = state["peers"]
    if peers is not None:
        peers = [p.numpy() for p in peers]
    return int(state["rounds_done"]), states, peers, list(state["history"])


# ------------------------------------------------- in a run's DAgger rounds
def split_parts(data: Transitions, split: str, clients: int) -> list[Transitions]:
    """Each client's own samples of ``data``.

    ``agents``: client k keeps the samples of the signals i with i mod clients
    = k; ``episodes``: client k keeps the episodes whose seed mod clients = k.

    Raises:
        UserError: samples without their episode's seed, or a client left
            without samples.
    """
    if split == "agents":
        key = data.agent
    elif data.episode is None:
        raise UserError(
            "these samples do not record their episodes: split them by agents "
            "(cooperate.split=agents), or collect them again"
        )
    else:
        key = data.episode
    parts = [data.subset(np.flatnonzero(key % clients == k)) for k in range(clients)]
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UserError(
            f"client(s) {empty} of {clients} get no samples split by {split}: "
            "lower cooperate.clients or collect more episodes per round"
        )
    return parts


def agents_of_clients(num_agents: int, clients: int) -> list[int]:
    """Per agent index, the client that trains on it with the ``agents`` split."""
    return [i % clients for i in range(num_agents)]


@torch.no_grad()
def client_scores(
    students: Sequence[Student], loss: DistillationLoss, data: Transitions
) -> tuple[list[float], list[float], float]:
    """How the students fare on held-out samples.

    Returns:
        Each student's loss towards the teacher and agreement with it, and the
        mean over pairs of students of the share of samples where their
        choices differ (0 for one student).
    """
    from marlkd.distill.trainer import agreement

    t = _tensors(data)
    losses, agreements, choices = [], [], []
    for student in students:
        student.eval()
        out = student(t["obs"], t["agent"], t["mask"])
        value, _ = loss(
            out,
            mask=t["mask"],
            teacher_scores=t["teacher_scores"],
            teacher_action=t["teacher_action"],
        )
        losses.append(float(value))
        agreements.append(
            float(agreement(out.logits, t["teacher_scores"], t["mask"]).mean())
        )
        choices.append(out.logits.argmax(dim=1))
    pairs = [
        float((choices[a] != choices[b]).float().mean())
        for a in range(len(choices))
        for b in range(a + 1, len(choices))
    ]
    return losses, agreements, float(np.mean(pairs)) if pairs else 0.0
