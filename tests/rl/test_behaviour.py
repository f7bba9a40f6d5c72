"""The exploring behaviours: allowed actions only, the right odds, repeatable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marlkd.rl.behaviour import EpsilonGreedy, Sampling
from marlkd.rollout.batching import AgentBatcher


class FixedLogits(torch.nn.Module):
    """Logits read from the observation itself."""

    def forward(self, obs, agent, mask):
        return type("Out", (), {"logits": obs, "features": obs})()


BATCHER = AgentBatcher(["a", "b"], obs_size=3, num_actions=3)
# a prefers action 2, which is not allowed; b has only action 1 allowed
OBS = {"a": np.array([0.0, np.log(3.0), 9.0]), "b": np.array([5.0, 0.0, 0.0])}
MASKS = {"a": np.array([1, 1, 0]), "b": np.array([0, 1, 0])}


def draws(policy, n: int, seed: int = 0) -> np.ndarray:
    policy.reset(np.random.default_rng(seed))
    return np.array(
        [[policy.act(OBS, MASKS).actions[k] for k in ("a", "b")] for _ in range(n)]
    )


def test_greedy_takes_the_best_allowed_action():
    actions = draws(EpsilonGreedy(FixedLogits(), BATCHER, epsilon=0.0), 5)
    assert (actions == [1, 1]).all()


def test_epsilon_draws_uniformly_among_allowed_actions():
    actions = draws(EpsilonGreedy(FixedLogits(), BATCHER, epsilon=1.0), 4000)
    assert set(actions[:, 0]) == {0, 1} and set(actions[:, 1]) == {1}
    assert (actions[:, 0] == 0).mean() == pytest.approx(0.5, abs=0.03)


def test_sampling_follows_the_softmax_over_allowed_actions():
    # a: softmax(0, log 3) over the allowed actions is (1/4, 3/4)
    actions = draws(Sampling(FixedLogits(), BATCHER), 4000)
    assert set(actions[:, 1]) == {1}
    assert set(actions[:, 0]) == {0, 1}
    assert (actions[:, 0] == 1).mean() == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EpsilonGreedy(FixedLogits(), BATCHER, 0.5),
        lambda: Sampling(FixedLogits(), BATCHER),
    ],
)
def test_the_episode_generator_alone_decides(make):
    assert (draws(make(), 50, seed=3) == draws(make(), 50, seed=3)).all()
    assert not (draws(make(), 50, seed=3) == draws(make(), 50, seed=4)).all()
