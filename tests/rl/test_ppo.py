"""PPO: GAE and the clipped loss by hand, masking, tiny runs and a learning check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.errors import UserError
from marlkd.rl.config import RLConfig
from marlkd.rl.dqn import greedy_episode, train_dqn
from marlkd.rl.ppo import (
    Critic,
    PPOConfig,
    RunningNorm,
    clipped_surrogate,
    gae,
    masked_distribution,
    train_ppo,
)
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.teachers import make_controller
from marlkd.tracking import MetricWriter, read_metrics


# ------------------------------------------------------------------ helpers
@pytest.fixture
def make_env():
    """Builds grid2x2 environments of a given duration and closes them after."""
    envs = []

    def build(duration: float) -> TrafficSignalEnv:
        envs.append(
            TrafficSignalEnv(
                get_scenario("grid2x2"), TrafficEnvConfig(duration=duration)
            )
        )
        return envs[-1]

    yield build
    for env in envs:
        env.close()


def student_for(env, kind: str = "mlp", seed: int = 0):
    layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    torch.manual_seed(seed)
    return make_student(kind, layout, hidden=(32, 32)), batcher


def tiny_config(**overrides) -> PPOConfig:
    settings_ = {"episodes": 2, "episodes_per_update": 1, "minibatch_size": 64,
                 "update_epochs": 2, "eval_every": 1}  # fmt: skip
    return PPOConfig(**{**settings_, **overrides})


# ---------------------------------------------------------------------- GAE
def test_gae_matches_hand_computation():
    # γ = 0.9, λ = 0.8, so γλ = 0.72; the episode is truncated after step 2
    # and goes on from V = 2.0.
    #   δ2 = 2 + 0.9 * 2.0 - 1.5 = 2.3       Â2 = 2.3
    #   δ1 = 0 + 0.9 * 1.5 - 1.0 = 0.35      Â1 = 0.35 + 0.72 * 2.3   = 2.006
    #   δ0 = 1 + 0.9 * 1.0 - 0.5 = 1.4       Â0 = 1.4  + 0.72 * 2.006 = 2.84432
    rewards = np.array([1.0, 0.0, 2.0])
    values = np.array([0.5, 1.0, 1.5])
    advantages, returns = gae(rewards, values, np.array(2.0), gamma=0.9, lam=0.8)
    np.testing.assert_allclose(advantages, [2.84432, 2.006, 2.3], rtol=1e-12)
    np.testing.assert_allclose(returns, [3.34432, 3.006, 3.8], rtol=1e-12)


def test_gae_runs_per_agent_and_reduces_to_bootstrapped_returns_at_lambda_one():
    # Column 0 repeats the hand-made episode; column 1 has other numbers, so a
    # mix-up between agents shows. With λ = 1, R_t is the discounted return
    # that continues from the last value:
    #   R2 = 2 + 0.9 * 2 = 3.8, R1 = 0.9 * 3.8 = 3.42, R0 = 1 + 0.9 * 3.42 = 4.078
    #   R2 = 0 + 0.9 * 10 = 9, R1 = -1 + 0.9 * 9 = 7.1, R0 = 3 + 0.9 * 7.1 = 9.39
    rewards = np.array([[1.0, 3.0], [0.0, -1.0], [2.0, 0.0]])
    values = np.array([[0.5, 4.0], [1.0, 5.0], [1.5, 6.0]])
    last_value = np.array([2.0, 10.0])
    advantages, returns = gae(rewards, values, last_value, gamma=0.9, lam=1.0)
    np.testing.assert_allclose(returns, [[4.078, 9.39], [3.42, 7.1], [3.8, 9.0]])
    np.testing.assert_allclose(advantages, returns - values)

    # λ = 0 leaves one-step TD errors.
    advantages, _ = gae(rewards, values, last_value, gamma=0.9, lam=0.0)
    np.testing.assert_allclose(advantages[:, 0], [1.4, 0.35, 2.3])


# ----------------------------------------------------------- clipped loss
def test_clipped_surrogate_matches_hand_computation():
    # Old probabilities 0.5, new 0.8, 0.3, 0.55: ratios 1.6, 0.6, 1.1; ε = 0.2.
    #   Â =  1: min(1.6 * 1, 1.2 * 1)   =  1.2   clipped, no gradient
    #   Â = -2: min(0.6 * -2, 0.8 * -2) = -1.6   clipped, no gradient
    #   Â = -1: min(1.1 * -1, 1.1 * -1) = -1.1   inside the range
    # loss = -(1.2 - 1.6 - 1.1) / 3 = 0.5; d loss / d log π_3 = -(1/3)(-1)(1.1).
    log_prob = torch.log(torch.tensor([0.8, 0.3, 0.55], dtype=torch.float64))
    log_prob.requires_grad_(True)
    old = torch.log(torch.full((3,), 0.5, dtype=torch.float64))
    advantages = torch.tensor([1.0, -2.0, -1.0], dtype=torch.float64)
    loss = clipped_surrogate(log_prob, old, advantages, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(log_prob.grad, [0.0, 0.0, 1.1 / 3], rtol=1e-12)


# ---------------------------------------------------------------- masking
@st.composite
def logits_and_masks(draw):
    rows = draw(st.integers(1, 6))
    actions = draw(st.integers(1, 8))
    mask = np.array(
        draw(st.lists(st.booleans(), min_size=rows * actions, max_size=rows * actions))
    ).reshape(rows, actions)
    for row in np.flatnonzero(~mask.any(axis=1)):  # every agent may do something
        mask[row, draw(st.integers(0, actions - 1))] = True
    logits = np.array(
        draw(
            st.lists(
                st.floats(-20, 20), min_size=rows * actions, max_size=rows * actions
            )
        ),
        dtype=np.float32,
    ).reshape(rows, actions)
    # The forbidden actions look best: only the mask keeps them out.
    logits[~mask] += 100.0
    return torch.from_numpy(logits), torch.from_numpy(mask)


@settings(max_examples=60, deadline=None)
@given(logits_and_masks())
def test_masked_actions_are_never_sampled(data):
    logits, mask = data
    dist = masked_distribution(logits, mask)
    draws = dist.sample((200,))  # (200, B)
    assert mask.gather(1, draws.T).all()
    assert (dist.probs[~mask] == 0).all()
    assert torch.isfinite(dist.entropy()).all()
    assert torch.isfinite(dist.log_prob(draws)).all()


def test_running_norm_matches_the_statistics_of_everything_seen():
    rng = np.random.default_rng(0)
    batches = [rng.normal(-30, 7, size=n) for n in (50, 3, 200)]
    norm = RunningNorm()
    for batch in batches:
        norm.update(batch)
    seen = np.concatenate(batches)
    assert norm.mean == pytest.approx(seen.mean(), rel=1e-9)
    assert norm.var == pytest.approx(seen.var(), rel=1e-9)
    np.testing.assert_allclose(norm.denormalize(norm.normalize(seen)), seen)


def test_central_critic_reads_the_state_and_the_agent(make_env):
    env = make_env(60)
    network, batcher = student_for(env)
    critic = Critic(network.layout, central=True, hidden=[16])
    assert critic.input_size == env.state_space.shape[0]
    state = torch.rand(1, critic.input_size).expand(4, -1)
    values = critic(None, torch.arange(4), state)
    assert values.shape == (4,)
    assert len(set(values.tolist())) == 4  # one state, four agents' values


# -------------------------------------------------------------- tiny runs
@pytest.mark.parametrize("critic", ["local", "central"])
@pytest.mark.parametrize("kind", ["mlp", "phase"])
def test_tiny_run_returns_a_curve_and_logs_rl_metrics(make_env, tmp_path, critic, kind):
    env = make_env(300)
    network, batcher = student_for(env, kind)
    before = [p.detach().clone() for p in network.parameters()]
    writer = MetricWriter(tmp_path, tensorboard=False)
    try:
        curve = train_ppo(
            env, network, tiny_config(critic=critic), batcher=batcher,
            writer=writer, step_offset=1_000, progress=False,
        )  # fmt: skip
    finally:
        writer.close()

    assert [c["episode"] for c in curve] == [1, 2]
    steps = curve[0]["env_steps"] - 1_000
    assert steps > 0 and curve[1]["env_steps"] == 1_000 + 2 * steps
    assert all(math.isfinite(c["avg_delay_s"]) for c in curve)
    series = read_metrics(tmp_path)
    for key in ("rl/policy_loss", "rl/value_loss", "rl/entropy", "rl/approx_kl",
                "rl/clip_fraction", "rl/explained_variance", "rl/episode_return",
                "rl/behaviour_avg_delay_s", "rl/eval_avg_delay_s"):  # fmt: skip
        assert [step for step, _ in series[key]] == [c["env_steps"] for c in curve]
        assert all(math.isfinite(v) for _, v in series[key]), key
    assert "rl/kickstart_loss" not in series
    assert any(
        not torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True)
    )


def test_kickstarting_logs_the_distillation_term(make_env, tmp_path):
    env = make_env(300)
    network, batcher = student_for(env)
    teacher = make_controller("max-pressure", env)
    config = tiny_config(kickstart=2.0, kickstart_episodes=2, kickstart_temperature=2)
    writer = MetricWriter(tmp_path, tensorboard=False)
    try:
        train_ppo(
            env, network, config, batcher=batcher, teacher=teacher, writer=writer,
            progress=False,
        )  # fmt: skip
    finally:
        writer.close()

    series = read_metrics(tmp_path)
    assert [v for _, v in series["rl/kickstart_weight"]] == [2.0, 1.0]
    losses = [v for _, v in series["rl/kickstart_loss"]]
    assert len(losses) == 2 and all(v > 0 and math.isfinite(v) for v in losses)


def test_bad_settings_are_refused(make_env):
    env = make_env(60)
    network, batcher = student_for(env)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_ppo(env, network, tiny_config(kickstart=1.0), batcher=batcher)
    with pytest.raises(ValueError, match="unknown critic"):
        train_ppo(env, network, tiny_config(critic="global"), batcher=batcher)


# ------------------------------------------------------------ resuming
@pytest.mark.parametrize("critic", ["local", "central"])
def test_an_interrupted_run_resumes_to_the_same_weights_and_curve(
    make_env, tmp_path, critic
):
    env = make_env(300)
    # updates of two episodes: [0, 1], [2, 3]; the stopped run ends after [0, 1]
    config = tiny_config(episodes=4, episodes_per_update=2, critic=critic)

    whole, batcher = student_for(env)
    whole_curve = train_ppo(
        env, whole, config, batcher=batcher, checkpoint=tmp_path / "a.pt",
        progress=False,
    )  # fmt: skip

    stopped, _ = student_for(env)
    short = PPOConfig(**{**vars(config), "episodes": 2})
    train_ppo(
        env, stopped, short, batcher=batcher, checkpoint=tmp_path / "b.pt",
        progress=False,
    )  # fmt: skip
    resumed, _ = student_for(env)
    writer = MetricWriter(tmp_path / "resumed", tensorboard=False)
    try:
        curve = train_ppo(
            env, resumed, config, batcher=batcher, checkpoint=tmp_path / "b.pt",
            writer=writer, progress=False,
        )  # fmt: skip
    finally:
        writer.close()

    # the resumed run trained only the second update, and ended where the
    # uninterrupted one did: policy, critic, optimiser and value normaliser
    assert [v for _, v in read_metrics(tmp_path / "resumed")["rl/episode"]] == [4]
    assert curve == whole_curve
    assert [c["episode"] for c in curve] == [2, 4]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    for key, value in a["critic"].items():
        assert torch.equal(value, b["critic"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)
    assert a["value_norm"] == b["value_norm"]
    assert (a["episode"], a["env_steps"], a["updates"]) == (
        b["episode"], b["env_steps"], b["updates"],
    )  # fmt: skip


def test_a_state_that_does_not_fit_is_refused_in_one_line(make_env, tmp_path):
    env = make_env(60)
    network, batcher = student_for(env)
    state = tmp_path / "rl_state.pt"
    train_ppo(
        env, network, tiny_config(episodes=1), batcher=batcher, checkpoint=state,
        progress=False,
    )  # fmt: skip
    saved = state.read_bytes()

    def refusal(config=None, network=None) -> str:
        state.write_bytes(saved)
        if network is None:
            network, _ = student_for(env)
        with pytest.raises(UserError) as error:
            train_ppo(
                env, network, config or tiny_config(episodes=2), batcher=batcher,
                checkpoint=state, progress=False,
            )  # fmt: skip
        assert "\n" not in str(error.value)
        assert state.read_bytes() == saved, "a refused state must stay as it was"
        return str(error.value)

    wider = make_student("mlp", network.layout, hidden=(48, 32))
    assert "does not fit" in refusal(network=wider)
    assert "(48," in refusal(network=wider) and "(32," in refusal(network=wider)
    message = refusal(tiny_config(episodes=2, critic_hidden=[16]))
    assert "critic" in message and "does not fit" in message
    assert "ppo.critic: local" in refusal(tiny_config(episodes=2, critic="central"))

    # a DQN run's state, and a file that is no training state at all
    dqn = tmp_path / "dqn.pt"
    train_dqn(
        env, student_for(env)[0], RLConfig(episodes=1, learning_starts=10**6),
        batcher=batcher, checkpoint=dqn, progress=False,
    )  # fmt: skip
    saved = dqn.read_bytes()
    assert "from a DQN run" in refusal()
    saved = b"not a checkpoint"
    assert "could not be read" in refusal()


# --------------------------------------------------------------- learning
@pytest.mark.slow
def test_ppo_learns_to_beat_random_signals(make_env):
    """16 ten-minute episodes of grid2x2 take an MLP from gridlock to ~17 s.

    An untrained MLP's greedy policy holds its phases and jams the grid (around
    200 s of delay per vehicle on this seed); random phases give about 64 s.
    """
    env = make_env(600)
    network, batcher = student_for(env)
    untrained = greedy_episode(env, network, batcher, 9_000)["avg_delay_s"]
    random_ = make_controller("random", env, seed=0)
    observations, infos = env.reset(seed=9_000)
    while env.agents:
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        observations, _, _, _, infos = env.step(random_(observations, masks))
    random_delay = env.last_episode.network["avg_delay_s"]

    config = PPOConfig(episodes=16, episodes_per_update=1, minibatch_size=64,
                       lr=1e-3, eval_every=16)  # fmt: skip
    curve = train_ppo(env, network, config, batcher=batcher, progress=False)
    trained = curve[-1]["avg_delay_s"]
    assert trained < random_delay < untrained, (trained, random_delay, untrained)
    assert trained < 0.6 * random_delay
