"""Clients trained on Ray actors end with the in-process clients' students.

Three clients on two actors, so one actor trains two of them; the samples are
small and synthetic, so a round takes milliseconds and the time goes to
starting the actors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from marlkd.distill.cooperative import learn_together
from marlkd.distill.losses import DistillationLoss

sys.path.insert(0, str(Path(__file__).parents[1] / "distill"))
from test_cooperative import LOSS, config, student, teacher_data  # noqa: E402

ray = pytest.importorskip("ray")

PARTS = [
    teacher_data(40, seed=1, agents=(0,)),
    teacher_data(60, seed=2, agents=(1,)),
    teacher_data(50, seed=3, agents=(2,)),
]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level="WARNING",
    )
    # workers cannot import this test module: send its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def run(method, loss=LOSS, workers=0):
    cfg = config(method, mutual_weight=1.0)
    return learn_together(student(), PARTS, loss, cfg, workers=workers, progress=False)


def assert_same_students(a, b) -> None:
    for x, y in zip(a.students, b.students, strict=True):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)


@pytest.mark.parametrize("method", ["fedavg", "mutual"])
def test_ray_clients_give_the_in_process_students(ray_session, method):
    local = run(method)
    remote = run(method, workers=2)
    assert_same_students(local, remote)
    assert [r["distill/train_loss"] for r in local.history] == [
        r["distill/train_loss"] for r in remote.history
    ]
    if method == "mutual":
        assert not torch.equal(
            local.students[0].head.weight, local.students[1].head.weight
        )


class DiesOnce(DistillationLoss):
    """Ends its worker process the first time it runs while ``flag`` exists."""

    def __init__(self, flag: Path):
        super().__init__({"kl": 1.0})
        self.flag = str(flag)

    def forward(self, *args, **kwargs):
        if os.path.exists(self.flag):
            os.remove(self.flag)
            os._exit(1)
        return super().forward(*args, **kwargs)


def test_a_failed_worker_is_replaced_and_its_clients_train_again(ray_session, tmp_path):
    flag = tmp_path / "die-once"
    flag.touch()
    remote = run("mutual", loss=DiesOnce(flag), workers=2)
    assert not flag.exists()  # a worker did die
    assert_same_students(run("mutual"), remote)


def test_no_ray_is_imported_in_process():
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1] / "distill")!r})
        from test_cooperative import LOSS, config, student, teacher_data
        from marlkd.distill.cooperative import learn_together
        parts = [teacher_data(20, 0), teacher_data(20, 1)]
        learn_together(student(), parts, LOSS, config("mutual"), progress=False)
        assert "ray" not in sys.modules, "ray was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
