"""PPO with parameter sharing, with a local (IPPO) or central (MAPPO) critic.

Every agent acts on its own observation with one shared policy (any marlkd
student: its logits define a categorical distribution over the allowed
actions). Rollouts are whole episodes of every agent, run by a collector (in
this process or on Ray workers) with every agent sampling from the current
policy; the learner then recomputes log-probabilities and values from the
recorded observations (its weights have not changed since, so they are those
of the behaviour), and the policy takes a few epochs of minibatch steps on the
clipped surrogate (Schulman et al., 2017, "Proximal Policy Optimization
Algorithms"):

    ρ_t = π_θ(a_t | o_t) / π_old(a_t | o_t)
    L_clip = -mean_t min(ρ_t Â_t, clip(ρ_t, 1 - ε, 1 + ε) Â_t)

with advantages from generalised advantage estimation (Schulman et al., 2016,
"High-Dimensional Continuous Control Using Generalized Advantage Estimation"),
per agent along its episode and normalised over the batch:

    δ_t = r_t + γ V(s_{t+1}) - V(s_t)
    Â_t = δ_t + γλ Â_{t+1}           R_t = Â_t + V(s_t)

Episodes end by truncation only (the simulated time runs out), so the last
step bootstraps with the value of the last observation. The critic is a
separate MLP, trained on L_V = mean_t (V(s_t) - R_t)^2 with its targets
normalised by their running mean and standard deviation:

    local    V(o_i, i): the agent's own scaled observation and a one-hot of
             its index; independent PPO (de Witt et al., 2020, "Is Independent
             Learning All You Need in the StarCraft Multi-Agent Challenge?")
    central  V(s, i): the global state, every agent's scaled observation end
             to end, and the one-hot; MAPPO (Yu et al., 2022, "The Surprising
             Effectiveness of PPO in Cooperative Multi-Agent Games")

The critic only trains the policy: the student that is kept, and exported,
has the same architecture whichever critic is used.

With a ``checkpoint`` path, the whole training state (policy, critic,
optimiser, value normaliser, random generators, counters and curve) is
written there after every update, and a run that finds it continues from it
to the same weights and curve as a run that was never interrupted.

Kickstarting (Schmitt et al., 2018) adds a distillation term towards the
teacher's scores, recorded on the visited states while collecting, with a
weight λ_k annealed linearly over episodes:

    L = L_clip + c_V L_V - c_H H[π_θ(· | o_t)]
        + λ_k T² KL(softmax(z_teacher / T) || softmax(z / T))
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical
from torch.nn import functional as F
from tqdm.auto import tqdm

from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import kl_loss
from marlkd.errors import UserError
from marlkd.rl.behaviour import Sampling
from marlkd.rl.config import PPOConfig
from marlkd.rl.dqn import decision_sizes, episode_returns, evaluate_when_due
from marlkd.rl.state import check_fits, read_training_state
from marlkd.rollout import LocalCollector, warn_idle_workers
from marlkd.rollout.batching import AgentBatcher
from marlkd.students.base import masked_value
from marlkd.students.layout import AgentLayout
from marlkd.tracking import MetricWriter
from marlkd.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

CRITICS = ("local", "central")
DEFAULT_CRITIC_HIDDEN = {"local": [64, 64], "central": [256, 256]}


class Critic(nn.Module):
    """The value of an agent's situation, from its observation or the state.

    Args:
        layout: the agents; their observation scales normalise the inputs.
        central: read the global state (every observation end to end, in
            layout order) instead of the agent's own padded observation.
        hidden: widths of the tanh hidden layers.
    """

    def __init__(self, layout: AgentLayout, central: bool, hidden: list[int]):
        super().__init__()
        self.central = central
        self.num_agents = layout.num_agents
        if central:  # (S,)
            inv_scale = 1.0 / np.concatenate([a.obs_scale for a in layout.agents])
        else:  # (N, D_max), 0 on padded entries
            inv_scale = layout.inverse_scales()
        self.register_buffer("inv_scale", torch.as_tensor(inv_scale).float())
        sizes = [inv_scale.shape[-1] + self.num_agents, *hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [_orthogonal(nn.Linear(n_in, n_out), np.sqrt(2)), nn.Tanh()]
        self.net = nn.Sequential(*layers, _orthogonal(nn.Linear(sizes[-1], 1), 1.0))

    @property
    def input_size(self) -> int:
        return self.inv_scale.shape[-1]

    def forward(
        self, obs: torch.Tensor, agent: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        """Values (B,) of padded observations (B, D_max) or states (B, S)."""
        x = state * self.inv_scale if self.central else obs * self.inv_scale[agent]
        one_hot = F.one_hot(agent, self.num_agents).to(x.dtype)
        return self.net(torch.cat([x, one_hot], dim=-1)).squeeze(-1)


class RunningNorm:
    """Running mean and variance of value targets, merged batch by batch.

    The critic predicts normalised returns, so the scale of the rewards, which
    grows with the traffic, does not set the size of its gradients (the value
    normalisation of Yu et al., 2022).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: np.ndarray) -> None:
        if not self.enabled or x.size == 0:
            return
        n, mean, var = x.size, float(x.mean()), float(x.var())
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + 1e-8))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std if self.enabled else x

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean if self.enabled else x


def masked_distribution(logits: torch.Tensor, mask: torch.Tensor) -> Categorical:
    """The categorical policy over the allowed actions only.

    Disallowed actions get the finite ``masked_value`` logit, so their
    probability is exactly 0 and log-probabilities and entropy stay free of NaN.
    """
    return Categorical(logits=logits.masked_fill(~mask, masked_value(logits.dtype)))


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    last_value: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and value targets of one truncated episode.

    Args:
        rewards: (T, ...) rewards r_t, one column per agent.
        values: (T, ...) values V(s_t) of the states acted in.
        last_value: (...) value of the state after the last step; the episode
            was truncated there, so the return continues from it.
        gamma: discount γ.
        lam: λ, from 0 (one-step TD) to 1 (Monte Carlo with a bootstrap).

    Returns:
        (Â, R) of shape (T, ...): Â_t = δ_t + γλ Â_{t+1}, R_t = Â_t + V(s_t).
    """
    advantages = np.zeros_like(values)
    running = np.zeros_like(last_value)
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """-mean min(ρ Â, clip(ρ, 1 - ε, 1 + ε) Â).

    Here ρ = exp(log π - log π_old) is the probability ratio.
    """
    ratio = (log_prob - old_log_prob).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    return -torch.min(unclipped, clipped).mean()


def train_ppo(
    env,
    policy_network: torch.nn.Module,
    config: PPOConfig,
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
    """Train ``policy_network`` as a shared policy on ``env`` with PPO.

    Args:
        env: the multi-agent environment; with ``critic="central"`` its
            ``state()`` must be every observation end to end. Greedy
            evaluations run on it, and so does the collection when no
            ``collector`` is given.
        policy_network: a marlkd student, mapping (obs, agent, mask) to logits;
            its layout sets the critic's input scales.
        config: the PPO settings; ``kickstart > 0`` needs a teacher.
        batcher: agent names and padded sizes.
        teacher: labels every visited state for the kickstarting term, when
            the collection runs in this process.
        collector: runs the rollout episodes (``marlkd.rollout``); None
            collects in this process on ``env``, labelled by ``teacher``.
        writer: where ``rl/...`` metrics go, indexed by environment steps.
        eval_seed: seed of the greedy evaluation episodes, a validation seed
            kept apart from training seeds and from the held-out test seeds.
        step_offset: environment steps already taken before this call (a
            distilled student's collection), so curves share one axis.
        checkpoint: where the whole training state (policy, critic,
            optimiser, value normaliser, random generators) is written after
            every update; when it exists, training resumes from it.
        progress: show a progress bar over episodes.

    Returns:
        One record per greedy evaluation: ``env_steps``, ``episode`` and the
        network figures of that episode.

    Raises:
        UserError: ``checkpoint`` holds a state this run cannot continue:
            another algorithm's, another critic's, or networks of other sizes.
    """
    if config.critic not in CRITICS:
        raise ValueError(
            f"unknown critic '{config.critic}': choose one of {', '.join(CRITICS)}"
        )
    if collector is None:
        collector = LocalCollector(env, teacher, batcher)
    if config.kickstart > 0 and not collector.labels:
        raise ValueError("kickstarting needs a teacher")
    if config.episodes_per_update < 1 or config.minibatch_size < 1:
        raise ValueError("episodes_per_update and minibatch_size must be at least 1")
    warn_idle_workers(collector, config.episodes_per_update, "ppo.episodes_per_update")
    central = config.critic == "central"
    layout = policy_network.layout
    if list(layout.names) != list(batcher.agents):
        raise ValueError("the policy's layout and the batcher list different agents")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    critic = Critic(
        layout,
        central,
        list(config.critic_hidden) or DEFAULT_CRITIC_HIDDEN[config.critic],
    )
    if central and critic.input_size != env.state_space.shape[0]:
        raise ValueError(
            f"the central critic expects a state of {critic.input_size} entries "
            f"(every observation of the layout), the env gives "
            f"{env.state_space.shape[0]}"
        )
    optimizer = torch.optim.Adam(
        [*policy_network.parameters(), *critic.parameters()], lr=config.lr
    )
    value_norm = RunningNorm(config.value_norm)
    env_steps, updates, curve, episode = step_offset, 0, [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        episode, env_steps, updates, curve = _load_state(
            checkpoint, config.critic, policy_network, critic, optimizer,
            value_norm, rng,
        )  # fmt: skip
        logger.info("resuming PPO at episode %d of %d", episode, config.episodes)
    bar = tqdm(
        total=config.episodes,
        initial=episode,
        desc="ppo episodes",
        disable=None if progress else True,
    )

    while episode < config.episodes:
        first = episode
        lam = config.kickstart_weight(first)
        n_episodes = min(config.episodes_per_update, config.episodes - first)
        started = time.perf_counter()

        # collect: whole episodes, every agent sampling from the shared policy
        data, episodes = collector.collect(
            Sampling(policy_network, batcher),
            0.0,
            [config.seed + first + j for j in range(n_episodes)],
            first,
            rng,
            progress=False,
            label=lam > 0,
            rl=True,
            state=central,
        )
        env_steps += len(decision_sizes(data))
        episode += n_episodes
        bar.update(n_episodes)
        collect_s = time.perf_counter() - started

        # the batch: one row per (episode, step, agent), with the behaviour's
        # log-probabilities and values, and GAE along each agent's episode
        b = _evaluate_rollout(policy_network, critic, data, central, value_norm)
        b["advantage"], b["return"] = _advantages(
            data, b["value"], b.pop("value_next"), config
        )
        b = {k: torch.as_tensor(v) for k, v in b.items()}
        value_norm.update(b["return"].numpy())
        b["target"] = torch.as_tensor(value_norm.normalize(b["return"].numpy()))
        advantage = b["advantage"]
        b["advantage"] = (advantage - advantage.mean()) / (advantage.std() + 1e-8)

        # learn: epochs of minibatch steps on the clipped surrogate
        policy_network.train()
        critic.train()
        rows = len(b["action"])
        parts: dict[str, list[float]] = {}
        for _ in range(config.update_epochs):
            order = torch.randperm(rows)
            for start in range(0, rows, config.minibatch_size):
                idx = order[start : start + config.minibatch_size]
                out = policy_network(b["obs"][idx], b["agent"][idx], b["mask"][idx])
                dist = masked_distribution(out.logits, b["mask"][idx])
                log_prob = dist.log_prob(b["action"][idx])
                policy_loss = clipped_surrogate(
                    log_prob, b["log_prob"][idx], b["advantage"][idx], config.clip
                )
                value = critic(
                    b["obs"][idx], b["agent"][idx], b["state"][idx] if central else None
                )
                value_loss = F.mse_loss(value, b["target"][idx])
                entropy = dist.entropy().mean()
                loss = (
                    policy_loss
                    + config.value_coef * value_loss
                    - config.entropy_coef * entropy
                )
                if lam > 0:
                    kick = kl_loss(
                        out.logits,
                        b["teacher"][idx],
                        b["mask"][idx],
                        config.kickstart_temperature,
                    )
                    loss = loss + lam * kick
                    parts.setdefault("kickstart_loss", []).append(float(kick.detach()))

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(
                    policy_network.parameters(), config.max_grad_norm
                )
                nn.utils.clip_grad_norm_(critic.parameters(), config.max_grad_norm)
                optimizer.step()
                updates += 1

                with torch.no_grad():
                    log_ratio = log_prob - b["log_prob"][idx]
                    approx_kl = ((log_ratio.exp() - 1) - log_ratio).mean()
                    clipped = ((log_ratio.exp() - 1).abs() > config.clip).float()
                for key, x in (
                    ("policy_loss", policy_loss), ("value_loss", value_loss),
                    ("entropy", entropy), ("approx_kl", approx_kl),
                    ("clip_fraction", clipped.mean()),
                ):  # fmt: skip
                    parts.setdefault(key, []).append(float(x.detach()))

        # record: losses of the update, behaviour, and a greedy evaluation
        explained = 1.0 - float((b["return"] - b["value"]).var()) / max(
            float(b["return"].var()), 1e-8
        )
        metrics = {
            "rl/episode": episode,
            "rl/kickstart_weight": lam,
            "rl/episode_return": float(np.mean(episode_returns(data))),
            "rl/behaviour_avg_delay_s": float(
                np.mean([e["avg_delay_s"] for e in episodes])
            ),
            "rl/updates": updates,
            "rl/explained_variance": explained,
            **{f"rl/{key}": float(np.mean(v)) for key, v in parts.items()},
            "timers/rl_collect_s": collect_s,
            "timers/rl_update_s": time.perf_counter() - started - collect_s,
        }
        figures = evaluate_when_due(
            env, policy_network, batcher, config, first, episode, env_steps, eval_seed
        )
        if figures is not None:
            metrics["rl/eval_avg_delay_s"] = figures["avg_delay_s"]
            curve.append(figures)
        if writer is not None:
            writer.log(env_steps, metrics)
        if checkpoint is not None:
            _save_state(
                checkpoint, config.critic, episode, env_steps, updates, curve,
                policy_network, critic, optimizer, value_norm, rng,
            )  # fmt: skip
    bar.close()
    return curve


def _save_state(
    path, critic_kind, episode, env_steps, updates, curve,
    policy_network, critic, optimizer, value_norm, rng,
) -> None:  # fmt: skip
    """Everything an interrupted run needs, written atomically."""
    state = {
        "algorithm": "ppo",
        "critic_kind": critic_kind,
        "episode": episode,
        "env_steps": env_steps,
        "updates": updates,
        "curve": json.dumps(curve),
        "rng": json.dumps(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),
        "network": policy_network.state_dict(),
        "critic": critic.state_dict(),
        "optimizer": optimizer.state_dict(),
        "value_norm": json.dumps(
            {"mean": value_norm.mean, "var": value_norm.var, "count": value_norm.count}
        ),
    }
    data = io.BytesIO()
    torch.save(state, data)
    atomic_write_bytes(Path(path), data.getvalue())


def _load_state(path, critic_kind, policy_network, critic, optimizer, value_norm, rng):
    path = Path(path)
    state = read_training_state(path, "ppo")
    if state.get("critic_kind") != critic_kind:
        raise UserError(
            f"the training state {path} trained a {state.get('critic_kind')} "
            f"critic, this run a {critic_kind} one: set ppo.critic: "
            f"{state.get('critic_kind')} to resume it, or delete it to train "
            "from the start"
        )
    check_fits(path, state, {"network": policy_network, "critic": critic})
    policy_network.load_state_dict(state["network"])
    critic.load_state_dict(state["critic"])
    optimizer.load_state_dict(state["optimizer"])
    norm = json.loads(state["value_norm"])
    value_norm.mean, value_norm.var = float(norm["mean"]), float(norm["var"])
    value_norm.count = int(norm["count"])
    rng.bit_generator.state = json.loads(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    curve = json.loads(state["curve"])
    return int(state["episode"]), int(state["env_steps"]), int(state["updates"]), curve


@torch.no_grad()
def _evaluate_rollout(policy_network, critic, data: Transitions, central, value_norm):
    """The rollout's arrays, its log-probabilities and its (denormalised) values.

    ``value`` holds V of every row's state, ``value_next`` V of the state
    after it, which only the last step of an episode needs (the bootstrap).
    """
    policy_network.eval()
    critic.eval()
    obs, agent, mask = map(torch.from_numpy, (data.obs, data.agent, data.mask))
    action = torch.from_numpy(data.action)
    logits = policy_network(obs, agent, mask).logits
    log_prob = masked_distribution(logits, mask).log_prob(action)
    state = torch.from_numpy(data.state) if central else None
    next_state = torch.from_numpy(data.next_state) if central else None
    value_now = critic(obs, agent, state).numpy()
    value_next = critic(torch.from_numpy(data.next_obs), agent, next_state).numpy()
    b = {
        "obs": data.obs,
        "agent": data.agent,
        "mask": data.mask,
        "action": data.action,
        "log_prob": log_prob.numpy(),
        "value": value_norm.denormalize(value_now),
        "value_next": value_norm.denormalize(value_next),
    }
    if data.teacher_scores is not None:
        b["teacher"] = data.teacher_scores
    if central:
        b["state"] = data.state
    return b


def _advantages(data: Transitions, value, value_next, config: PPOConfig):
    """GAE per agent along each episode of the rollout, in the rollout's rows.

    The collector records every agent at every step (it refuses episodes in
    which agents come or go), so an episode's rows reshape to (steps, agents).
    """
    reward = data.reward * config.reward_scale
    advantage, target = np.zeros_like(value), np.zeros_like(value)
    sizes = decision_sizes(data)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    for e in dict.fromkeys(data.episode[starts]):
        steps = np.flatnonzero(data.episode[starts] == e)
        rows = slice(starts[steps[0]], ends[steps[-1]])
        n = sizes[steps[0]]
        shape = (len(steps), n)
        a, r = gae(
            reward[rows].reshape(shape),
            value[rows].reshape(shape),
            value_next[rows].reshape(shape)[-1],
            config.gamma,
            config.gae_lambda,
        )
        advantage[rows], target[rows] = a.reshape(-1), r.reshape(-1)
    return advantage, target


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer
