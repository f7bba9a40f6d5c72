"""Run an exported student without PyTorch: numpy and onnxruntime only.

    from marlkd.runtime import Runtime

    runtime = Runtime.load("runs/g4/export")
    actions = runtime.act(observations, masks)   # {agent: action}

``Runtime.load`` checks the export's metadata and the SHA-256 of every file
before it loads anything. Two backends compute the same network:

- ``onnxruntime`` runs the ONNX graph; it is the faster of the two on any
  batch of two rows or more.
- ``numpy`` evaluates the same network from the ONNX file's weights
  (``marlkd.runtime.numpy_net``). For one agent alone it runs a network cut to
  that agent's sizes in about a dozen numpy calls, which takes about half the
  time of a call into onnxruntime.

``backend="auto"`` (the default) acts for a single agent with numpy and runs
every batch with onnxruntime, or everything with numpy when onnxruntime is
not installed. A TorchScript export needs PyTorch and runs on its own
backend, ``torchscript``.

Importing this package imports neither PyTorch nor onnxruntime.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from marlkd.errors import UserError
from marlkd.runtime.metadata import read_export, reexport_hint
from marlkd.runtime.numpy_net import MASKED_LOGIT, NumpyNetwork, dense_tensors
from marlkd.runtime.onnx_reader import ProtobufError, read_initializers

__all__ = ["BACKENDS", "MASKED_LOGIT", "Runtime"]

BACKENDS = ("auto", "numpy", "onnxruntime", "torchscript")

_MAX_NAMED = 5  # agent names listed in an unknown-agent message


class Runtime:
    """An exported student, ready to act for its agents.

    Build it with ``Runtime.load``. Attributes: ``export_dir``, ``metadata``
    (the parsed ``metadata.json``), ``agents`` (names in index order),
    ``backend`` (as asked), ``obs_size`` and ``num_actions`` (padded sizes).
    """

    def __init__(
        self,
        export_dir: Path,
        metadata: dict,
        backend: str,
        session=None,
        numpy_net: NumpyNetwork | None = None,
        module=None,
    ):
        self.export_dir = export_dir
        self.metadata = metadata
        self.backend = backend
        self.agents = [a["name"] for a in metadata["agents"]]
        self.index = {name: i for i, name in enumerate(self.agents)}
        self.obs_size = int(metadata["padded"]["obs_size"])
        self.num_actions = int(metadata["padded"]["num_actions"])
        self._obs_sizes = [int(a["obs_size"]) for a in metadata["agents"]]
        self._action_counts = [int(a["num_actions"]) for a in metadata["agents"]]
        self._session = session
        self._numpy = numpy_net
        self._module = module

    # ------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        export_dir: str | Path,
        *,
        backend: str = "auto",
        threads: int | None = None,
        spinning: bool = False,
    ) -> Runtime:
        """Check and load an export folder.

        Args:
            export_dir: the folder ``marlkd export`` wrote.
            backend: "auto", "numpy", "onnxruntime" or, for a TorchScript
                export, "torchscript" (or "auto").
            threads: threads of onnxruntime or PyTorch; their default when None.
            spinning: let onnxruntime's threads spin between calls. That
                shortens large batches on idle cores, but takes CPU time from
                whatever shares the machine, such as the simulator, so it is
                off by default.

        Raises:
            UserError: a missing or altered file, an unknown backend, or a
                backend that cannot run this export.
        """
        export_dir = Path(export_dir)
        if backend not in BACKENDS:
            raise UserError(
                f"unknown runtime backend '{backend}': choose one of "
                f"{', '.join(BACKENDS)}"
            )
        metadata, contents = read_export(export_dir)
        network_files = {a["network"] for a in metadata["agents"]}
        if len(network_files) != 1:
            raise NotImplementedError(
                "this runtime runs exports whose agents share one network file; "
                f"this one has {len(network_files)}"
            )
        file = network_files.pop()
        data = contents[file]

        if metadata["network_format"] == "torchscript":
            if backend not in ("auto", "torchscript"):
                raise UserError(
                    f"{export_dir} holds a TorchScript network, which backend "
                    f"'{backend}' cannot run: re-export with --format onnx, or use "
                    "backend 'torchscript'"
                )
            module = _load_torchscript(data, threads)
            return cls(export_dir, metadata, "torchscript", module=module)
        if backend == "torchscript":
            raise UserError(
                f"{export_dir} holds an ONNX network: use backend auto, numpy or "
                "onnxruntime"
            )

        session = None
        if backend in ("auto", "onnxruntime"):
            session = _onnx_session(
                data, threads, spinning, required=backend == "onnxruntime"
            )
        numpy_net = None
        numpy_kind = metadata["network"].get("kind") in NumpyNetwork.KINDS
        if backend == "numpy" or (backend == "auto" and numpy_kind):
            try:
                initializers = read_initializers(data)
            except ProtobufError as exc:
                raise UserError(
                    f"{export_dir / file} is not a readable ONNX model ({exc}): "
                    f"{reexport_hint(metadata)}"
                ) from exc
            numpy_net = NumpyNetwork(
                metadata["network"],
                dense_tensors(metadata["network"], initializers),
                [int(a["obs_size"]) for a in metadata["agents"]],
                [int(a["num_actions"]) for a in metadata["agents"]],
            )
        return cls(export_dir, metadata, backend, session, numpy_net)

    # -------------------------------------------------------------- acting
    def act(
        self, observations: dict[str, np.ndarray], masks: dict[str, np.ndarray]
    ) -> dict[str, int]:
        """One action per agent of ``observations``, all in one batch.

        Args:
            observations: per agent its raw observation (obs_size,), any
                subset of the export's agents.
            masks: per agent, which of its actions are allowed now.

        Raises:
            UserError: an agent the export does not know, or an observation or
                mask of the wrong size.
        """
        if not observations:
            return {}
        if len(observations) == 1 and self._numpy is not None:
            ((name, obs),) = observations.items()
            i = self._agent_index(name)
            obs, mask = self._checked(i, obs, masks.get(name))
            return {name: self._numpy.policy(i)(obs, mask)}

        names = list(observations)
        obs, agent, mask = self.pad(observations, masks, names)
        _, actions = self.run(obs, agent, mask)
        return dict(zip(names, actions.tolist(), strict=True))

    def __call__(self, observations, masks, state=None) -> dict[str, int]:
        """``act``, with the signature ``marlkd.evaluate.simulate`` calls."""
        return self.act(observations, masks)

    def pad(
        self, observations: dict, masks: dict, names: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Padded arrays (obs [B, D_max], agent [B], mask [B, A_max]) of ``names``."""
        names = list(observations) if names is None else names
        obs = np.zeros((len(names), self.obs_size), dtype=np.float32)
        mask = np.zeros((len(names), self.num_actions), dtype=bool)
        agent = np.empty(len(names), dtype=np.int64)
        for row, name in enumerate(names):
            i = self._agent_index(name)
            o, m = self._checked(i, observations[name], masks.get(name))
            obs[row, : len(o)] = o
            mask[row, : len(m)] = m
            agent[row] = i
        return obs, agent, mask

    def run(
        self, obs: np.ndarray, agent: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, A_max) float32 and actions (B,) int64 of a padded batch.

        Masked actions hold ``MASKED_LOGIT``. This is the path for large
        batches: no per-agent Python work. It uses onnxruntime when loaded.
        """
        if self._session is None and self._numpy is not None:
            return self._numpy.run(obs, agent, mask)
        if self._session is not None:
            logits, actions = self._session.run(
                None, {"obs": obs, "agent": agent, "mask": mask}
            )
            return logits, actions
        import torch

        with torch.no_grad():
            logits, actions = self._module(
                torch.from_numpy(obs), torch.from_numpy(agent), torch.from_numpy(mask)
            )
        return logits.numpy(), actions.numpy()

    # ------------------------------------------------------------- helpers
    def _agent_index(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            known = ", ".join(self.agents[:_MAX_NAMED]) + (
                ", ..." if len(self.agents) > _MAX_NAMED else ""
            )
            raise UserError(
                f"agent '{name}' is not in the export {self.export_dir} (it knows "
                f"{len(self.agents)} agents: {known}): export a student trained "
                "for this scenario"
            ) from None

    def _checked(self, i: int, obs, mask) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            raise UserError(
                f"agent '{self.agents[i]}' has an observation but no action mask: "
                "pass a mask for every agent you pass an observation for"
            )
        obs = np.asarray(obs, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if obs.shape != (self._obs_sizes[i],) or mask.shape != (
            self._action_counts[i],
        ):
            raise UserError(
                f"agent '{self.agents[i]}' got an observation of shape {obs.shape} "
                f"and a mask of shape {mask.shape}; the export expects "
                f"({self._obs_sizes[i]},) and ({self._action_counts[i]},): pass "
                "the observations of the scenario the student was exported for"
            )
        return obs, mask


def _onnx_session(data: bytes, threads: int | None, spinning: bool, required: bool):
    """An onnxruntime session of the model, or None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        if required:
            raise UserError(
                "onnxruntime is not installed: `pip install 'marlkd[onnx]'`, or "
                "use the runtime's numpy backend"
            ) from None
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if spinning else "0"
    )
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _load_torchscript(data: bytes, threads: int | None):
    try:
        import torch
    except ImportError:
        raise UserError(
            "this export is TorchScript, which needs PyTorch: install torch, or "
            "re-export with --format onnx for the torch-free runtime"
        ) from None
    if threads is not None:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        # TorchScript is deprecated in PyTorch 2.x; marlkd export writes it for
        # libtorch (C++) deployments, and loading it still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
