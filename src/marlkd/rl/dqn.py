"""Independent DQN with parameter sharing, and kickstarting on top of it.

Every agent acts on its own observation with one shared Q-network (any marlkd
student: its logits are the Q-values), learning from a replay buffer of every
agent's transitions:

    y = r + γ Q_target(s', argmax_a' Q(s', a'))        double DQN (van Hasselt 2016)
    L_rl = Huber(Q(s, a) - y)

Actions outside the mask are never chosen, neither when acting nor in the
argmax of the target. The target network follows the online one by Polyak
averaging with rate τ. Episodes end by truncation only (the simulated hour
runs out), so every target bootstraps.

Training goes in iterations, the usual shape of distributed DQN (Horgan et
al., 2018, "Distributed Prioritized Experience Replay"): a collector runs
``episodes_per_iteration`` episodes with every agent ε-greedy on the current
network, in this process or on Ray workers, the transitions join the replay
buffer, and then the network takes ``updates_per_step`` gradient steps per new
environment step. The behaviour thus lags the learner by one iteration.

Kickstarting (Schmitt et al., 2018) adds a distillation term towards a
teacher's scores on the same replayed states, with a weight λ that is annealed
over episodes so the student starts from the teacher and is then free to pass
it:

    L = L_rl + λ_k · T² KL(softmax(z_teacher / T) || softmax(Q / T))
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import kl_loss
from marlkd.rl.behaviour import EpsilonGreedy
from marlkd.rl.config import RLConfig
from marlkd.rl.state import check_fits, read_training_state
from marlkd.rollout import LocalCollector, warn_idle_workers
from marlkd.rollout.batching import AgentBatcher
from marlkd.tracking import MetricWriter
from marlkd.utils import atomic_write_bytes

logger = logging.getLogger(__name__)


class ReplayBuffer:
    """A ring buffer of per-agent transitions, stored as padded arrays."""

    def __init__(self, capacity: int, obs_size: int, num_actions: int, teacher: bool):
        self.capacity = capacity
        self.size = 0
        self.pos = 0
        self.obs = np.zeros((capacity, obs_size), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_size), dtype=np.float32)
        self.agent = np.zeros(capacity, dtype=np.int64)
        self.mask = np.zeros((capacity, num_actions), dtype=bool)
        self.next_mask = np.zeros((capacity, num_actions), dtype=bool)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.teacher = (
            np.zeros((capacity, num_actions), dtype=np.float32) if teacher else None
        )

    def add(self, obs, agent, mask, action, reward, next_obs, next_mask, teacher=None):
        n = len(agent)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.next_obs[idx] = obs, next_obs
        self.agent[idx], self.action[idx], self.reward[idx] = agent, action, reward
        self.mask[idx], self.next_mask[idx] = mask, next_mask
        if self.teacher is not None:
            # no labels (λ has reached 0): zeros, which no loss reads
            self.teacher[idx] = 0.0 if teacher is None else teacher
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict:
        idx = rng.integers(0, self.size, size=batch_size)
        batch = {
            "obs": self.obs[idx],
            "next_obs": self.next_obs[idx],
            "agent": self.agent[idx],
            "mask": self.mask[idx],
            "next_mask": self.next_mask[idx],
            "action": self.action[idx],
            "reward": self.reward[idx],
        }
        if self.teacher is not None:
            batch["teacher"] = self.teacher[idx]
        return {k: torch.from_numpy(v) for k, v in batch.items()}


def train_dqn(
    env,
    network: torch.nn.Module,
    config: RLConfig,
    *,
    batcher: AgentBatcher,
    teacher=None,
    collector=None,
    writer: MetricWriter | None = None,
    eval_seed: int = 9_000,
    step_offset: int = 0,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``network`` as a shared Q-function on ``env`` for ``config.episodes``.

    Args:
        env: the multi-agent environment; greedy evaluations run on it, and
            so does the collection when no ``collector`` is given.
        network: maps (obs, agent, mask) to logits, read as Q-values.
        config: the DQN settings; ``kickstart > 0`` needs a teacher.
        batcher: agent names and padded sizes.
        teacher: labels every state for the kickstarting term, when the
            collection runs in this process.
        collector: runs the training episodes (``marlkd.rollout``); None
            collects in this process on ``env``, labelled by ``teacher``.
        writer: where ``rl/...`` metrics go, indexed by environment steps.
        eval_seed: seed of the greedy evaluation episodes, a validation seed
            kept apart from training seeds and from the held-out test seeds.
        step_offset: environment steps already taken before this call (a
            distilled student's collection), so curves share one axis.
        checkpoint: where the whole training state (networks, optimiser,
            replay buffer, random generators) is written after every
            iteration; when it exists, training resumes from it.

    Returns:
        One record per greedy evaluation: ``env_steps``, ``episode`` and the
        network figures of that episode.
    """
    if collector is None:
        collector = LocalCollector(env, teacher, batcher)
    if config.kickstart > 0 and not collector.labels:
        raise ValueError("kickstarting needs a teacher")
    if config.episodes_per_iteration < 1:
        raise ValueError("episodes_per_iteration must be at least 1")
    warn_idle_workers(
        collector, config.episodes_per_iteration, "rl.episodes_per_iteration"
    )
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    target = copy.deepcopy(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    buffer = ReplayBuffer(
        config.buffer_size, batcher.obs_size, batcher.num_actions, config.kickstart > 0
    )
    env_steps, updates, curve, episode = step_offset, 0, [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        episode, env_steps, updates, curve = _load_state(
            checkpoint, network, target, optimizer, buffer, rng
        )
        logger.info("resuming RL at episode %d of %d", episode, config.episodes)
    bar = tqdm(
        total=config.episodes,
        initial=episode,
        desc="rl episodes",
        disable=None if progress else True,
    )

    while episode < config.episodes:
        first = episode
        n_episodes = min(config.episodes_per_iteration, config.episodes - first)
        epsilon = config.epsilon(first)
        lam = config.kickstart_weight(first)
        started = time.perf_counter()

        # collect: every agent epsilon-greedy on the allowed phases
        data, episodes = collector.collect(
            EpsilonGreedy(network, batcher, epsilon),
            0.0,
            [config.seed + first + j for j in range(n_episodes)],
            first,
            rng,
            progress=False,
            label=lam > 0,
            rl=True,
        )
        sizes = decision_sizes(data)
        filled_before = buffer.size
        buffer.add(
            data.obs, data.agent, data.mask, data.action,
            data.reward * config.reward_scale, data.next_obs, data.next_mask,
            data.teacher_scores,
        )  # fmt: skip
        env_steps += len(sizes)
        episode += n_episodes
        bar.update(n_episodes)
        collect_s = time.perf_counter() - started

        # learn: double-DQN target, Huber loss, plus the kickstarting term;
        # updates_per_step per new step once learning_starts transitions are in
        filled = np.minimum(filled_before + np.cumsum(sizes), buffer.capacity)
        losses = []
        learning_steps = int((filled >= config.learning_starts).sum())
        for _ in range(config.updates_per_step * learning_steps):
            batch = buffer.sample(config.batch_size, rng)
            loss, parts = _dqn_loss(network, target, batch, config, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
            optimizer.step()
            _polyak(target, network, config.target_tau)
            losses.append(parts)
            updates += 1

        # record: the behaviour's episodes, the losses, a greedy evaluation
        metrics = {
            "rl/episode": episode - 1,
            "rl/epsilon": epsilon,
            "rl/kickstart_weight": lam,
            "rl/episode_return": float(np.mean(episode_returns(data))),
            "rl/behaviour_avg_delay_s": float(
                np.mean([e["avg_delay_s"] for e in episodes])
            ),
            "rl/updates": updates,
            "timers/rl_collect_s": collect_s,
            "timers/rl_update_s": time.perf_counter() - started - collect_s,
        }
        if losses:
            for key in losses[0]:
                metrics[f"rl/{key}"] = float(np.mean([p[key] for p in losses]))
        figures = evaluate_when_due(
            env, network, batcher, config, first, episode, env_steps, eval_seed
        )
        if figures is not None:
            metrics["rl/eval_avg_delay_s"] = figures["avg_delay_s"]
            curve.append(figures)
        if writer is not None:
            writer.log(env_steps, metrics)
        if checkpoint is not None:
            _save_state(
                checkpoint, episode, env_steps, updates, curve,
                network, target, optimizer, buffer, rng,
            )  # fmt: skip
    bar.close()
    return curve


def decision_sizes(data: Transitions) -> np.ndarray:
    """Rows of each decision (one environment step) of RL samples, in order."""
    new = np.ones(len(data), dtype=bool)
    new[1:] = (data.episode[1:] != data.episode[:-1]) | (
        data.step[1:] != data.step[:-1]
    )
    return np.diff(np.flatnonzero(np.append(new, True)))


def episode_returns(data: Transitions) -> list[float]:
    """Per episode of RL samples, the sum over its steps of the agents' mean reward."""
    sizes = decision_sizes(data)
    starts = np.cumsum(sizes) - sizes
    mean_reward = np.add.reduceat(data.reward.astype(np.float64), starts) / sizes
    episode = data.episode[starts]
    return [float(mean_reward[episode == e].sum()) for e in dict.fromkeys(episode)]


def _save_state(path, episode, env_steps, updates, curve, network, target,
                optimizer, buffer, rng) -> None:  # fmt: skip
    """Everything an interrupted run needs, written atomically."""
    arrays = {k: v for k, v in vars(buffer).items() if isinstance(v, np.ndarray)}
    state = {
        "algorithm": "dqn",
        "episode": episode,
        "env_steps": env_steps,
        "updates": updates,
        "curve": json.dumps(curve),
        "rng": json.dumps(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),
        "network": network.state_dict(),
        "target": target.state_dict(),
        "optimizer": optimizer.state_dict(),
        "buffer": {k: torch.from_numpy(v) for k, v in arrays.items()},
        "buffer_size": buffer.size,
        "buffer_pos": buffer.pos,
    }
    data = io.BytesIO()
    torch.save(state, data)
    atomic_write_bytes(Path(path), data.getvalue())


def _load_state(path, network, target, optimizer, buffer, rng):
    path = Path(path)
    state = read_training_state(path, "dqn")
    check_fits(path, state, {"network": network, "target": target})
    network.load_state_dict(state["network"])
    target.load_state_dict(state["target"])
    optimizer.load_state_dict(state["optimizer"])
    for key, value in state["buffer"].items():
        getattr(buffer, key)[...] = value.numpy()
    buffer.size, buffer.pos = int(state["buffer_size"]), int(state["buffer_pos"])
    rng.bit_generator.state = json.loads(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    curve = json.loads(state["curve"])
    return int(state["episode"]), int(state["env_steps"]), int(state["updates"]), curve


def evaluate_when_due(
    env, network, batcher, config, first: int, episode: int, env_steps: int,
    seed: int,
) -> dict | None:  # fmt: skip
    """A greedy episode on ``seed`` if one is due after episodes first..episode-1.

    One is due when the iteration passed a multiple of ``config.eval_every``,
    or ended the training. Returns the curve record (``env_steps``,
    ``episode`` and the network figures), or None.
    """
    every = config.eval_every
    if not every or (episode // every == first // every and episode < config.episodes):
        return None
    figures = greedy_episode(env, network, batcher, seed)
    logger.info(
        "episode %d (%d env steps): greedy delay %.2f s",
        episode,
        env_steps,
        figures["avg_delay_s"],
    )
    return {"env_steps": env_steps, "episode": episode, **figures}


def greedy_episode(env, network, batcher: AgentBatcher, seed: int) -> dict:
    """The network figures of one greedy episode."""
    observations, infos = env.reset(seed=seed)
    while env.agents:
        names = list(env.agents)
        masks = {a: infos[a]["action_mask"] for a in names}
        obs, agent, mask = batcher.pad(observations, masks, names)
        q = _q_values(network, obs, agent, mask)
        actions = np.where(mask, q, -np.inf).argmax(axis=1)
        observations, _, _, _, infos = env.step(
            {a: int(actions[i]) for i, a in enumerate(names)}
        )
    return dict(env.last_episode.network)


@torch.no_grad()
def _q_values(network, obs, agent, mask) -> np.ndarray:
    network.eval()
    out = network(
        torch.from_numpy(obs), torch.from_numpy(agent), torch.from_numpy(mask)
    )
    return out.logits.numpy()


def _dqn_loss(network, target, batch, config: RLConfig, lam: float):
    network.train()
    q = network(batch["obs"], batch["agent"], batch["mask"]).logits
    q_taken = q.gather(1, batch["action"][:, None]).squeeze(1)
    with torch.no_grad():
        next_online = network(
            batch["next_obs"], batch["agent"], batch["next_mask"]
        ).logits
        best = next_online.masked_fill(~batch["next_mask"], -torch.inf).argmax(dim=1)
        next_q = target(batch["next_obs"], batch["agent"], batch["next_mask"]).logits
        y = batch["reward"] + config.gamma * next_q.gather(1, best[:, None]).squeeze(1)
    td = F.smooth_l1_loss(q_taken, y)
    parts = {"td_loss": float(td.detach()), "q_mean": float(q_taken.detach().mean())}
    if lam <= 0:
        return td, parts
    kick = kl_loss(q, batch["teacher"], batch["mask"], config.kickstart_temperature)
    parts["kickstart_loss"] = float(kick.detach())
    return td + lam * kick, parts


@torch.no_grad()
def _polyak(target, online, tau: float) -> None:
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(1 - tau).add_(o, alpha=tau)
