"""Run configuration: the preset, YAML loading, overrides and their errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from marlkd.config import RunConfig, apply_override, load_config, to_commented_yaml
from marlkd.errors import UserError
from marlkd.schema import from_dict

PRESET = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
KEY_LINE = re.compile(r"^(?P<pad> *)(?P<key>[a-z_]+):")


def field_paths(config, prefix: str = "") -> set[str]:
    """Every key of a settings object, nested ones as ``section.key``."""
    paths = set()
    for f in dataclasses.fields(config):
        paths.add(prefix + f.name)
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            paths |= field_paths(value, f"{prefix}{f.name}.")
    return paths


def help_at(path: str) -> str:
    cls, obj = RunConfig, RunConfig()
    *sections, name = path.split(".")
    for section in sections:
        obj = getattr(obj, section)
        cls = type(obj)
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


# ------------------------------------------------------------------ preset
def preset_keys() -> list[tuple[str, str]]:
    """Each key of the preset as ``section.key``, with the line above it."""
    lines = PRESET.read_text().splitlines()
    keys, stack = [], []
    for i, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if match:
            stack[len(match["pad"]) // 2 :] = [match["key"]]
            keys.append((".".join(stack), lines[i - 1], match["pad"]))
    return keys


def test_every_preset_key_has_its_help_as_a_comment_directly_above():
    keys = preset_keys()
    assert len(keys) > 40
    for path, above, pad in keys:
        assert above.startswith(pad + "# "), f"no comment above {path}"
        assert above.strip().removeprefix("# ") == help_at(path), path


def test_preset_holds_every_key():
    """The preset lists the whole schema; regenerate it with `marlkd config`."""
    assert {path for path, _, _ in preset_keys()} == field_paths(RunConfig())


def test_preset_loads_to_the_defaults():
    assert load_config(PRESET) == RunConfig()
    assert load_config(None) == RunConfig()


def test_commented_yaml_round_trips():
    config = load_config(
        None,
        [
            "scenario.name=null",
            "scenario.net=nets/a b.net.xml",
            'scenario.routes=["r1.rou.xml", "r: 2 #.rou.xml"]',
            "scenario.end=1800",
            "student.hidden=[16, 8, 4]",
            'teacher="runs/x: y #1/student.pt"',  # quoted: the value is YAML
            "train.lr=1e-5",
            "env.sumo_args=[--step-length, '0.5']",
        ],
    )
    for c in (load_config(None), config):
        text = to_commented_yaml(c)
        assert from_dict(RunConfig, yaml.safe_load(text)) == c
    assert config.teacher == "runs/x: y #1/student.pt"
    assert config.scenario.routes == ["r1.rou.xml", "r: 2 #.rou.xml"]


# ----------------------------------------------------------------- errors
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("train:\n  epoch: 3\n", ["'train.epoch'", "epochs"]),
        ("trian:\n  epochs: 3\n", ["'trian'", "train"]),
        ("train:\n  epochs: three\n", ["'train.epochs'", "whole number"]),
        ("train:\n  epochs: 2.5\n", ["'train.epochs'", "whole number"]),
        ("loss:\n  kl: yes\n", ["'loss.kl'", "number"]),
        ("env:\n  gui: 1\n", ["'env.gui'", "true or false"]),
        ("student:\n  hidden: 64\n", ["'student.hidden'", "list"]),
        ("student:\n  hidden: [64, x]\n", ["'student.hidden[1]'"]),
        ("train: 5\n", ["train", "mapping"]),
        ("- a\n- b\n", ["run.yaml", "mapping"]),
        ("train:\n  epochs: [1\n", ["run.yaml", "not valid YAML", "line 3"]),
        ("train:\n\tepochs: 1\n", ["run.yaml", "not valid YAML"]),
    ],
)
def test_bad_config_file_names_the_key_or_file(tmp_path, text, needles):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("collect.iterations=0", "collect.iterations"),
        ("collect.method=ppo", "choose bc or dagger"),
        ("collect.beta_schedule=cosine", "linear, exponential or constant"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.val_fraction=0.5", "val_fraction"),
        ("eval.episodes=0", "eval.episodes"),
        ("loss.temperature=0", "temperature"),
        ("loss.kl=0", "at least one above 0"),
        ("env.yellow_time=12", "yellow_time"),
    ],
)
def test_invalid_values_are_refused(override, match):
    with pytest.raises(UserError, match=match):
        load_config(None, [override])


# -------------------------------------------------------------- overrides
def test_overrides_set_nested_keys_with_yaml_values(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  lr: 0.01\nteacher: fixed\n")
    config = load_config(
        path,
        [
            "train.epochs=3",
            "student.hidden=[32, 16]",
            "scenario.name=null",
            "scenario.sumocfg=a.sumocfg",
            "env.gui=true",
            "env.duration=300",
            "collect.beta=0.25",
            "train.lr=1e-4",
            "loss.temperature=2E+1",
        ],
    )
    assert config.train.epochs == 3
    assert config.train.lr == 1e-4  # from the override, not the file
    assert config.teacher == "fixed"  # from the file, untouched
    assert config.student.hidden == [32, 16]
    assert config.scenario.name is None and config.scenario.sumocfg == "a.sumocfg"
    assert config.env.gui is True and config.env.duration == 300.0
    assert config.collect.beta == 0.25
    assert config.loss.temperature == 20.0


def test_apply_override_builds_sections():
    data = {"train": {"epochs": 2}}
    apply_override(data, "train.lr=0.5")
    apply_override(data, "a.b.c=[1, {x: y}]")
    apply_override(data, "teacher=")
    assert data == {
        "train": {"epochs": 2, "lr": 0.5},
        "a": {"b": {"c": [1, {"x": "y"}]}},
        "teacher": None,
    }


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.epochs", "lacks '='"),
        ("train.epochs=[1", "YAML cannot read"),
        ("teacher.name=x", "'teacher' is not a section"),
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("train.epochs=3=4", "'train.epochs' must be a whole number"),
    ],
)
def test_bad_overrides(override, match):
    data = {"teacher": "fixed"}
    with pytest.raises(UserError, match=re.escape(match)):
        apply_override(data, override)
        from_dict(RunConfig, data)


@settings(max_examples=60, deadline=None)
@given(
    epochs=st.integers(min_value=1, max_value=10**9),
    temperature=st.floats(
        min_value=0, max_value=1e300, exclude_min=True, allow_subnormal=False
    ),
    scale=st.floats(min_value=1e-6, max_value=1e6),
)
def test_overrides_give_exactly_the_values(epochs, temperature, scale):
    config = load_config(
        None,
        [
            f"train.epochs={epochs}",
            f"loss.temperature={temperature!r}",
            f"env.demand_scale={scale}",
        ],
    )
    assert config.train.epochs == epochs
    assert config.loss.temperature == temperature
    assert config.env.demand_scale == scale
