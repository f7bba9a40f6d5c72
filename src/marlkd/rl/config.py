"""Settings of DQN and PPO training, free of PyTorch so configs load without it."""

from __future__ import annotations

from dataclasses import dataclass

from marlkd.schema import option


@dataclass
class Kickstarting:
    """What DQN and PPO share: the pull towards a teacher, evaluation, seed.

    Kickstarting (Schmitt et al. 2018) adds λ_k times a distillation term to
    the RL loss, λ falling linearly from ``kickstart`` to 0 over
    ``kickstart_episodes`` episodes.
    """

    kickstart: float = option(
        0.0, "initial weight λ of the distillation term towards the teacher"
    )
    kickstart_episodes: float = option(
        10.0, "episodes over which λ falls linearly to 0"
    )
    kickstart_temperature: float = option(1.0, "softmax temperature of that term")
    eval_every: int = option(
        5, "greedy evaluation episode on a held-out seed every this many episodes"
    )
    seed: int = option(0, "seed of the first training episode and of the networks")

    def kickstart_weight(self, episode: float) -> float:
        if self.kickstart <= 0:
            return 0.0
        fraction = min(1.0, episode / max(self.kickstart_episodes, 1e-9))
        return self.kickstart * (1.0 - fraction)


@dataclass
class RLConfig(Kickstarting):
    """Reinforcement learning: DQN for teachers, baselines and kickstarting."""

    episodes: int = option(0, "training episodes; 0 turns RL off")
    episodes_per_iteration: int = option(
        1,
        "episodes collected with one policy before its updates; as many as the "
        "rollout workers keeps every worker busy",
    )
    gamma: float = option(0.9, "discount per decision")
    lr: float = option(5e-4, "Adam learning rate")
    batch_size: int = option(256, "transitions per gradient step")
    buffer_size: int = option(100_000, "transitions kept in the replay buffer")
    learning_starts: int = option(2_000, "transitions gathered before learning")
    updates_per_step: int = option(
        1, "gradient steps per environment step, taken after each iteration"
    )
    target_tau: float = option(0.01, "Polyak rate of the target network")
    eps_start: float = option(1.0, "exploration rate at the start")
    eps_end: float = option(0.02, "exploration rate after eps_episodes")
    eps_episodes: float = option(10.0, "episodes over which exploration decays")
    reward_scale: float = option(0.1, "factor on the environment's reward")

    def epsilon(self, episode: float) -> float:
        fraction = min(1.0, episode / max(self.eps_episodes, 1e-9))
        return self.eps_start + (self.eps_end - self.eps_start) * fraction


@dataclass
class PPOConfig(Kickstarting):
    """Proximal policy optimisation with a shared policy, IPPO or MAPPO."""

    episodes: int = option(0, "training episodes; 0 turns RL off")
    episodes_per_update: int = option(
        2, "whole episodes of every agent collected before each update"
    )
    gamma: float = option(0.99, "discount per decision")
    gae_lambda: float = option(0.95, "λ of generalised advantage estimation")
    clip: float = option(0.2, "clip range ε of the probability ratio")
    lr: float = option(3e-4, "Adam learning rate of the policy and the critic")
    update_epochs: int = option(4, "passes over the rollout per update")
    minibatch_size: int = option(256, "agent decisions per gradient step")
    entropy_coef: float = option(0.01, "weight c_H of the entropy bonus")
    value_coef: float = option(0.5, "weight c_V of the value loss")
    max_grad_norm: float = option(
        0.5, "gradient norm clip, for the policy and the critic separately"
    )
    reward_scale: float = option(0.1, "factor on the environment's reward")
    critic: str = option(
        "local",
        "value function: local (IPPO, the agent's own observation) or central"
        " (MAPPO, the global state)",
    )
    critic_hidden: list[int] = option(
        [], "hidden widths of the critic; empty: [64, 64] local, [256, 256] central"
    )
    value_norm: bool = option(
        True, "normalise value targets by their running mean and std"
    )
