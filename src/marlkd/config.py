"""The typed configuration of a distillation run, with YAML load and save.

The dataclasses below are the schema: every key of a YAML preset in
``configs/`` is a field here, and its help is the field's description. Any key
can be overridden on the command line with ``--set section.key=value``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from marlkd.envs.traffic.env import TrafficEnvConfig
from marlkd.errors import UserError
from marlkd.rl.config import PPOConfig, RLConfig
from marlkd.schema import from_dict, option, to_dict


@dataclass
class ScenarioConfig:
    """Which network and demand to simulate."""

    name: str | None = option(
        "grid4x4", "built-in scenario (see `marlkd scenarios`); unset with net/sumocfg"
    )
    net: str | None = option(None, "a SUMO network file of your own (.net.xml)")
    routes: list[str] = option([], "route files for `net`")
    begin: float | None = option(None, "simulation start in seconds, for `net`")
    end: float | None = option(None, "simulation end in seconds, for `net`")
    sumocfg: str | None = option(None, "a SUMO configuration file (.sumocfg)")

    def build(self):
        """The scenario these settings name."""
        from marlkd.envs.traffic import scenarios

        if self.sumocfg:
            return scenarios.scenario_from_sumocfg(Path(self.sumocfg))
        if self.net:
            if not self.routes:
                raise UserError(
                    "scenario.net is set but scenario.routes is empty: give the"
                    " demand with --routes FILE[,FILE]"
                )
            routes = [Path(r) for r in self.routes]
            return scenarios.user_scenario(Path(self.net), routes, self.begin, self.end)
        return scenarios.get_scenario(self.name or "grid4x4")


@dataclass
class StudentConfig:
    """The student network."""

    kind: str = option(
        "phase",
        "phase: one small network scores every phase from its movements, so any "
        "intersection fits; mlp: a plain MLP on the padded observation",
    )
    hidden: list[int] = option([64, 64], "sizes of the hidden layers")
    shared: bool = option(
        True, "one network for all agents (true) or one per agent (false, mlp only)"
    )
    agent_embedding: int = option(
        0, "size of a learned per-agent embedding added to the input; 0 for none"
    )


@dataclass
class LossConfig:
    """Weights of the distillation loss terms; a zero weight turns a term off."""

    kl: float = option(1.0, "KL to the teacher's softened scores (Hinton et al.)")
    ce: float = option(0.0, "cross-entropy on the teacher's chosen action")
    mse: float = option(0.0, "mean squared error on the teacher's scores")
    feature: float = option(0.0, "feature matching through a learned projection")
    temperature: float = option(
        1.0, "softmax temperature of the KL term; small values sharpen the teacher"
    )


@dataclass
class CollectConfig:
    """How labelled data is gathered."""

    method: str = option(
        "dagger",
        "bc: the teacher drives every episode; dagger: the student drives with "
        "probability 1 - beta and the teacher labels every visited state",
    )
    iterations: int = option(3, "collection rounds; each adds episodes and retrains")
    episodes_per_iteration: int = option(1, "simulated episodes per round")
    beta: float = option(1.0, "probability the teacher acts, in the first round")
    beta_schedule: str = option(
        "linear",
        "how beta falls over rounds: linear (to beta_final), exponential "
        "(times beta_decay each round) or constant",
    )
    beta_final: float = option(0.0, "beta in the last round, for the linear schedule")
    beta_decay: float = option(0.5, "factor per round, for the exponential schedule")
    seed: int = option(0, "seed of the first training episode; then +1 each")
    reuse: str | None = option(
        None,
        "the dataset folder of an earlier run (RUN/dataset) whose rounds join "
        "every round's training data; its agents and sizes must match",
    )
    validate: bool = option(
        False,
        "after every round, run the student for one episode on the validation "
        "seed 9000 and log its delay (a learning curve against environment steps)",
    )
    workers: int = option(
        0,
        "rollout workers: Ray actors in their own processes, one simulation each, "
        "sharing each round's episodes; 0 collects in this process without Ray. "
        "The data is the same for any number",
    )
    ray_address: str | None = option(
        None,
        "join this Ray cluster (e.g. auto, or ray://HOST:10001) instead of starting "
        "a local Ray; with workers 0, one worker per CPU of the cluster",
    )

    def beta_at(self, iteration: int) -> float:
        """β of a round: the chance that the teacher, not the student, acts."""
        if self.method == "bc":
            return 1.0
        if self.beta_schedule == "constant" or self.iterations <= 1:
            return self.beta
        if self.beta_schedule == "exponential":
            return self.beta * self.beta_decay**iteration
        fraction = iteration / (self.iterations - 1)
        return self.beta + (self.beta_final - self.beta) * fraction


@dataclass
class TrainConfig:
    """The optimisation of the student."""

    epochs: int = option(40, "most passes over the aggregated data per round")
    batch_size: int = option(256, "samples per minibatch")
    lr: float = option(3e-3, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    val_fraction: float = option(0.1, "share of the data held out for validation")
    patience: int = option(
        6, "stop a round after this many epochs without a better validation loss"
    )
    seed: int = option(0, "seed of initialisation and minibatch order")


@dataclass
class LearnTogether:
    """How students learn together: the settings of every client and round."""

    method: str = option(
        "none",
        "none: one student trained on all the data; fedavg: clients train on "
        "their own parts and their parameters are averaged every round "
        "(McMahan et al. 2017); mutual: each client keeps its own student, "
        "pulled towards its peers' predictions (Zhang et al. 2018)",
    )
    rounds: int = option(10, "rounds of local training followed by combining")
    local_epochs: int = option(
        2, "passes of each client over its own samples per round"
    )
    mutual_weight: float = option(
        1.0, "weight of the KL term towards the peers (mutual)"
    )
    mutual_temperature: float = option(
        1.0, "softmax temperature of the KL term towards the peers (mutual)"
    )

    def check(self, methods: tuple[str, ...], where: str = "") -> None:
        """Raise a UserError naming the first bad setting (keys under ``where``)."""
        if self.method not in methods:
            choices = ", ".join(methods[:-1]) + " or " + methods[-1]
            raise UserError(f"{where}method is '{self.method}': choose {choices}")
        for key in ("rounds", "local_epochs"):
            if getattr(self, key) < 1:
                raise UserError(f"{where}{key} is {getattr(self, key)}: give 1 or more")
        if self.mutual_weight < 0:
            raise UserError(
                f"{where}mutual_weight is {self.mutual_weight}: give 0 or more"
            )
        if self.mutual_temperature <= 0:
            raise UserError(
                f"{where}mutual_temperature is {self.mutual_temperature}: give a "
                "temperature above 0"
            )


@dataclass
class CooperateConfig(LearnTogether):
    """Students that learn together in each round of a distillation run."""

    clients: int = option(
        4, "clients, each training on its own part of every round's data"
    )
    split: str = option(
        "agents",
        "how the data is parted: agents (client k keeps the signals i with i mod "
        "clients = k and, with mutual, drives them in the run's student) or "
        "episodes (client k keeps the episodes whose seed mod clients = k)",
    )

    def validate(self) -> None:
        self.check(("none", "fedavg", "mutual"), "cooperate.")
        if self.method == "none":
            return
        if self.clients < 2:
            raise UserError(
                f"cooperate.clients is {self.clients}: give 2 or more, or set "
                "cooperate.method: none for one student"
            )
        if self.split not in ("agents", "episodes"):
            raise UserError(
                f"cooperate.split is '{self.split}': choose agents or episodes"
            )


@dataclass
class EvalConfig:
    """Evaluation on held-out seeds."""

    episodes: int = option(5, "episodes per controller")
    seed: int = option(
        10_000, "seed of the first evaluation episode; far from training seeds"
    )
    controllers: list[str] = option(
        ["teacher", "student", "fixed", "random"], "controllers to compare"
    )


@dataclass
class RunConfig:
    """Everything a distillation run needs; saved resolved in its folder."""

    scenario: ScenarioConfig = option(ScenarioConfig(), "network and demand")
    env: TrafficEnvConfig = option(TrafficEnvConfig(), "environment settings")
    teacher: str = option(
        "max-pressure", "a rule-based controller's name or a student checkpoint"
    )
    student: StudentConfig = option(StudentConfig(), "the student network")
    loss: LossConfig = option(LossConfig(), "distillation loss terms")
    collect: CollectConfig = option(CollectConfig(), "data collection")
    train: TrainConfig = option(TrainConfig(), "optimisation")
    cooperate: CooperateConfig = option(
        CooperateConfig(),
        "students that learn together: each round trains clients on parts of "
        "the data instead of one student on all of it",
    )
    eval: EvalConfig = option(EvalConfig(), "evaluation on held-out seeds")
    rl: RLConfig = option(
        RLConfig(),
        "RL fine-tuning after distillation; rl.episodes > 0 with rl.kickstart > 0 "
        "is kickstarting (Schmitt et al. 2018)",
    )

    def validate(self) -> None:
        self.env.validate()
        _validate_rl(self.rl)
        if self.collect.method not in ("bc", "dagger"):
            raise UserError(
                f"collect.method is '{self.collect.method}': choose bc or dagger"
            )
        if self.collect.beta_schedule not in ("linear", "exponential", "constant"):
            raise UserError(
                f"collect.beta_schedule is '{self.collect.beta_schedule}': choose "
                "linear, exponential or constant"
            )
        if self.collect.iterations < 1 or self.collect.episodes_per_iteration < 1:
            raise UserError(
                "collect.iterations and episodes_per_iteration must be >= 1"
            )
        if self.collect.workers < 0:
            raise UserError(
                f"collect.workers is {self.collect.workers}: choose 0 (collect in "
                "this process) or a number of Ray workers"
            )
        if self.train.epochs < 1 or self.train.batch_size < 1:
            raise UserError("train.epochs and train.batch_size must be >= 1")
        if self.eval.episodes < 1:
            raise UserError("eval.episodes must be >= 1")
        if not 0.0 < self.train.val_fraction < 0.5:
            raise UserError("train.val_fraction must lie between 0 and 0.5")
        if self.loss.temperature <= 0:
            raise UserError("loss.temperature must be above 0")
        weights = (self.loss.kl, self.loss.ce, self.loss.mse, self.loss.feature)
        if any(w < 0 for w in weights) or not any(weights):
            raise UserError(
                "loss weights must be >= 0 and at least one above 0 (kl, ce, mse,"
                " feature)"
            )
        if self.student.kind == "routing":
            raise UserError(
                "student.kind is routing, which only a run builds (cooperate.method "
                "mutual, split agents): choose phase or mlp"
            )
        self._validate_cooperate()

    def _validate_cooperate(self) -> None:
        co = self.cooperate
        co.validate()
        if co.method == "none":
            return
        if self.loss.feature > 0:
            raise UserError(
                f"loss.feature is {self.loss.feature} with cooperate.method "
                f"{co.method}: the feature projection is neither averaged nor "
                "exchanged between clients; set loss.feature=0"
            )
        episodes = self.collect.episodes_per_iteration
        if co.split == "episodes" and episodes < co.clients:
            raise UserError(
                f"cooperate.split episodes gives {co.clients} clients but "
                f"collect.episodes_per_iteration is {episodes}: every client needs "
                f"an episode per round; set collect.episodes_per_iteration="
                f"{co.clients} or cooperate.split=agents"
            )


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a number, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot: ``lr: 1e-4`` would be
    the text "1e-4" and then rejected as not a number.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class TeacherConfig:
    """A teacher (or a from-scratch baseline) trained by reinforcement learning."""

    scenario: ScenarioConfig = option(ScenarioConfig(), "network and demand")
    env: TrafficEnvConfig = option(TrafficEnvConfig(), "environment settings")
    network: StudentConfig = option(
        StudentConfig(kind="mlp", hidden=[256, 256], agent_embedding=16),
        "the network trained; a large one for a teacher, a student-sized one for "
        "the RL-from-scratch baseline",
    )
    algorithm: str = option(
        "dqn",
        "dqn: independent DQN with parameter sharing; ppo: IPPO, or MAPPO with "
        "ppo.critic central",
    )
    observe: str = option(
        "local",
        "what the network sees: local (its own intersection), neighbours (its "
        "own and up to `neighbours` neighbours' observations) or global (every "
        "intersection's); the last two make a centralized teacher",
    )
    neighbours: int = option(4, "neighbour slots of observe: neighbours")
    workers: int = option(
        0,
        "rollout workers: Ray actors in their own processes, one simulation each, "
        "running the training episodes; 0 collects in this process without Ray. "
        "The data is the same for any number; give them episodes to share with "
        "rl.episodes_per_iteration or ppo.episodes_per_update",
    )
    ray_address: str | None = option(
        None,
        "join this Ray cluster (e.g. auto, or ray://HOST:10001) instead of starting "
        "a local Ray; with workers 0, one worker per CPU of the cluster",
    )
    rl: RLConfig = option(RLConfig(episodes=60), "DQN settings")
    ppo: PPOConfig = option(PPOConfig(episodes=60), "PPO settings")
    eval: EvalConfig = option(
        EvalConfig(controllers=["teacher", "max-pressure", "fixed"]),
        "evaluation on held-out seeds",
    )

    def validate(self) -> None:
        self.env.validate()
        _validate_rl(self.rl)
        if self.algorithm not in ("dqn", "ppo"):
            raise UserError(f"algorithm is '{self.algorithm}': choose dqn or ppo")
        if self.observe not in ("local", "neighbours", "global"):
            raise UserError(
                f"observe is '{self.observe}': choose local, neighbours or global"
            )
        if self.neighbours < 0:
            raise UserError("neighbours must be 0 or more")
        if self.workers < 0:
            raise UserError(
                f"workers is {self.workers}: choose 0 (collect in this process) or "
                "a number of Ray workers"
            )
        if self.ppo.episodes_per_update < 1:
            raise UserError("ppo.episodes_per_update must be >= 1")
        if self.observe != "local" and self.network.kind != "mlp":
            raise UserError(
                f"observe {self.observe} needs network.kind mlp: the phase network "
                "reads one intersection's movements"
            )
        if self.observe != "local" and self.algorithm != "dqn":
            raise UserError(
                "a centralized teacher (observe neighbours or global) is trained "
                "with algorithm dqn; set algorithm: dqn"
            )
        episodes = self.rl.episodes if self.algorithm == "dqn" else self.ppo.episodes
        if episodes < 1:
            raise UserError(
                f"{self.algorithm if self.algorithm == 'ppo' else 'rl'}.episodes must"
                " be >= 1 to train a teacher"
            )


def _validate_rl(rl: RLConfig) -> None:
    if rl.episodes < 0 or rl.batch_size < 1 or rl.buffer_size < rl.batch_size:
        raise UserError(
            "rl.episodes must be >= 0, rl.batch_size >= 1 and rl.buffer_size >="
            " rl.batch_size"
        )
    if rl.episodes_per_iteration < 1:
        raise UserError("rl.episodes_per_iteration must be >= 1")
    if not 0 <= rl.gamma < 1:
        raise UserError(f"rl.gamma is {rl.gamma}: choose a discount in [0, 1)")
    if rl.kickstart < 0:
        raise UserError("rl.kickstart must be >= 0")


def load_config(
    path: Path | None, overrides: list[str] | None = None, schema=None
) -> RunConfig:
    """Read a YAML preset (or the defaults) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file {path} not found: pass an existing YAML file")
        try:
            data = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UserError(
                f"config file {path} is not valid YAML{where}: fix it"
            ) from exc
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        apply_override(data, item)
    config = from_dict(schema or RunConfig, data)
    config.validate()
    return config


def apply_override(data: dict, item: str) -> None:
    """Set ``section.key=value`` in nested ``data``; the value is read as YAML."""
    if "=" not in item:
        raise UserError(f"override '{item}' lacks '=': write it as section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw else None
    except yaml.YAMLError as exc:
        raise UserError(f"override '{item}' has a value YAML cannot read") from exc
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = value


def save_config(config: RunConfig, path: Path) -> None:
    from marlkd.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def to_commented_yaml(config, indent: int = 0) -> str:
    """YAML of ``config`` with each key's help as a comment above it."""
    import dataclasses

    lines = []
    pad = "  " * indent
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        lines.append(f"{pad}# {f.metadata.get('help', '')}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(to_commented_yaml(value, indent + 1))
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            lines.append(f"{pad}{f.name}: {text.removesuffix('...').strip()}")
    return "\n".join(lines)
