"""Export a run's student as ONNX or TorchScript, and deploy an export in SUMO.

``export_run`` turns ``RUN_DIR/checkpoints/student.pt`` into a folder holding
the network file and ``metadata.json`` (format in ``marlkd.runtime.metadata``).
The network takes

    obs    float32 (B, D_max)   raw observations, zero-padded
    agent  int64   (B,)         agent index of each row
    mask   bool    (B, A_max)   allowed actions, False on padded ones

with a dynamic batch axis B, and returns ``logits`` float32 (B, A_max), masked
actions at ``MASKED_LOGIT``, and ``action`` int64 (B,), the argmax over the
allowed actions (the first one on a tie, as PyTorch's argmax).

The graph is written from the student's weights rather than traced, in a form
that computes the same function with fewer and larger operations:

- the per-agent observation scale is folded into the phase student's
  per-action feature maps, which are computed from their non-zero entries
  only, with one row of values per distinct map (``_phase_network``);
- the agent embedding's contribution to the first layer, constant per agent,
  becomes a per-agent bias;
- the per-action layers run on (B * A, ...) matrices, so that onnxruntime
  fuses each MatMul, Add and Relu into one Gemm;
- tables whose values repeat are stored as their distinct values and a code
  per entry (lossless, ``compact``), rebuilt by constant nodes that
  onnxruntime evaluates once, when it loads the model.

With ``quantize="int8"`` every weight matrix is stored as int8 with one float
scale per tensor (symmetric: w ~ q * max|w| / 127) and rebuilt by constant
nodes (Cast, Mul) that onnxruntime folds at load; activations stay float, so a
row's result does not depend on the rest of its batch (onnxruntime's
``quantize_dynamic`` would quantize activations with a scale taken over the
whole batch). Biases, scales and feature maps stay exact.

``deploy`` runs an export as the signal controllers of a scenario, by default
the one its run was trained on, through ``marlkd.runtime`` only (no PyTorch for
an ONNX export).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marlkd.errors import UserError
from marlkd.runtime.metadata import (
    EXPORT_VERSION,
    FORMAT,
    METADATA_FILE,
    NETWORK_FORMATS,
    metadata_checksum,
    sha256_bytes,
)
from marlkd.runtime.numpy_net import MASKED_LOGIT
from marlkd.utils import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

QUANTIZE = ("int8",)
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # what opset 17 needs; old enough for any onnxruntime >= 1.13
NETWORK_FILES = {"onnx": "student.onnx", "torchscript": "student.pt"}
INPUTS = {
    "obs": ("float32", ["batch", "obs_size"]),
    "agent": ("int64", ["batch"]),
    "mask": ("bool", ["batch", "num_actions"]),
}
OUTPUTS = {
    "logits": ("float32", ["batch", "num_actions"]),
    "action": ("int64", ["batch"]),
}


# ------------------------------------------------------------------ network
@dataclass
class ExportNetwork:
    """A student as named numpy tensors plus how they connect.

    Attributes:
        structure: the ``network`` entry of the metadata: ``kind`` (phase or
            mlp), ``per_agent``, ``layers`` (hidden layers), ``maps`` and
            ``features`` (phase), and which tensors are stored as ``indices``
            (small unsigned integers read as int64), ``encoded`` or
            ``quantized``.
        tensors: the tensors, as stored (encoded and quantized ones in parts).
    """

    structure: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def network_from_student(student) -> ExportNetwork:
    """The exported form of a ``PhaseStudent`` or ``MLPStudent``.

    Raises:
        UserError: a student kind the exporter does not know.
    """
    if student.kind == "phase":
        return _phase_network(student)
    if student.kind == "mlp":
        return _mlp_network(student)
    if student.kind == "routing":
        return _routing_network(student)
    raise UserError(
        f"marlkd export knows phase, mlp and routing students, not "
        f"{student.kind!r}: distil a phase or mlp student"
    )


def _routing_network(student) -> ExportNetwork:
    """Clients' mlp students, one per agent, as one mlp with a network per agent.

    Agent i gets the layers of the client that drives it: a client's shared
    network becomes agent i's own, its agent embedding folded into agent i's
    first bias, so the per-agent form of ``_mlp_network`` computes the
    routing student's function exactly.

    Raises:
        UserError: clients of the phase kind, whose per-agent form the runtime
            lacks.
    """
    if student.config["client_kind"] != "mlp":
        raise UserError(
            "marlkd export cannot write a routing student of "
            f"{student.config['client_kind']} clients (mutual distillation split "
            "by agents): the runtime has no phase network per agent; distil with "
            "student.kind mlp, or with cooperate.split episodes or method fedavg"
        )
    layout = student.layout
    networks = [_mlp_network(c) for c in student.clients]
    clients = [n.tensors for n in networks]
    per_agent = [n.structure["per_agent"] for n in networks]
    layers = networks[0].structure["layers"]

    def of_agent(name: str, i: int) -> np.ndarray:
        k = int(student.client_of[i])
        tensor = clients[k][name]
        if per_agent[k]:
            return tensor[i]
        if name == "layer0_bias" and tensor.ndim == 2:  # embedding folded in
            return tensor[i]
        return tensor

    tensors = {"inv_scale": layout.inverse_scales(), "exists": layout.action_exists()}
    names = [f"layer{j}_{p}" for j in range(layers) for p in ("weight", "bias")]
    for name in [*names, "head_weight", "head_bias"]:
        # both forms are padded to the layout's sizes already
        rows = [of_agent(name, i) for i in range(layout.num_agents)]
        tensors[name] = np.stack(rows).astype(np.float32)
    structure = {"kind": "mlp", "per_agent": True, "layers": layers}
    return ExportNetwork(structure, tensors)


def _linears(sequential) -> list:
    from torch import nn

    return [m for m in sequential if isinstance(m, nn.Linear)]


def _np(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


def _phase_network(student) -> ExportNetwork:
    """The phase student with its feature maps as one sparse product.

    Agent i's features are f = x @ M_i with M_i = inv_scale_i * (its map), a
    (D, A*K) matrix that is mostly zeros. Over the P entries (d_p, c_p) that
    are non-zero in some agent's map, the graph computes

        f = ((x @ E) * values[map of i]) @ S,    E[d_p, p] = 1, S[p, c_p] = 1

    (E is ``feature_picker``, S ``feature_selector``), so the work per row is
    set by P, whatever the number of distinct maps (agents whose scales, maps
    and actions agree share a row of values). E is a matrix product rather
    than a column gather because onnxruntime gathers columns one element at a
    time.
    """
    layout = student.layout
    n, d = layout.num_agents, layout.max_obs_size
    a, k = layout.max_actions, layout.num_action_features

    maps = layout.padded_action_features() * layout.inverse_scales()[:, :, None, None]
    maps = maps.reshape(n, d, a * k)
    exists = layout.action_exists()
    unique: dict[bytes, int] = {}
    map_of = np.array(
        [
            unique.setdefault(m.tobytes() + e.tobytes(), len(unique))
            for m, e in zip(maps, exists, strict=True)
        ],
        dtype=np.int64,
    )
    firsts = [int(np.flatnonzero(map_of == u)[0]) for u in range(len(unique))]
    obs_index, columns = np.nonzero((maps != 0).any(axis=0))
    entries = np.arange(len(obs_index))
    picker = np.zeros((d, len(obs_index)), dtype=np.float32)
    picker[obs_index, entries] = 1.0
    selector = np.zeros((len(obs_index), a * k), dtype=np.float32)
    selector[entries, columns] = 1.0

    linears = _linears(student.body)
    w0, b0 = _np(linears[0].weight), _np(linears[0].bias)
    tensors = {
        "feature_picker": picker,
        "feature_values": np.stack([maps[i][obs_index, columns] for i in firsts]),
        "feature_selector": selector,
        "context_share": (exists / exists.sum(axis=1, keepdims=True)).astype(
            np.float32
        ),
        "exists": exists,
        "layer0_weight": w0[:, : 2 * k].T.copy(),
        "layer0_bias": _embedding_bias(student, w0[:, 2 * k :], b0),
    }
    if len(unique) > 1:
        tensors["map_of"] = map_of
    _add_layers(tensors, linears[1:], student.head)
    structure = {
        "kind": "phase",
        "per_agent": False,
        "layers": len(linears),
        "maps": len(unique),
        "features": k,
    }
    return ExportNetwork(structure, tensors)


def _add_layers(tensors: dict, hidden: list, head) -> None:
    for j, linear in enumerate(hidden, start=1):
        tensors[f"layer{j}_weight"] = _np(linear.weight).T.copy()
        tensors[f"layer{j}_bias"] = _np(linear.bias)
    tensors["head_weight"] = _np(head.weight).T.copy()
    tensors["head_bias"] = _np(head.bias)


def _embedding_bias(student, w_embedding: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The first layer's bias, plus each agent's embedding term when it has one."""
    if student.embedding is None:
        return bias
    return (bias + _np(student.embedding.weight) @ w_embedding.T).astype(np.float32)


def _mlp_network(student) -> ExportNetwork:
    layout = student.layout
    n, d, a = layout.num_agents, layout.max_obs_size, layout.max_actions
    tensors = {"inv_scale": layout.inverse_scales(), "exists": layout.action_exists()}

    if student.shared:
        linears = _linears(student.body)
        w0, b0 = _np(linears[0].weight), _np(linears[0].bias)
        tensors["layer0_weight"] = w0[:, :d].T.copy()
        tensors["layer0_bias"] = _embedding_bias(student, w0[:, d:], b0)
        _add_layers(tensors, linears[1:], student.head)
    else:
        # One network per agent, stacked and zero-padded to the largest sizes;
        # padded inputs are zero and padded actions masked, so padding is inert.
        per_agent = [_linears(body) for body in student.bodies]
        linears = per_agent[0]
        for j in range(len(linears)):
            n_in = d if j == 0 else linears[j].in_features
            w = np.zeros((n, n_in, linears[j].out_features), dtype=np.float32)
            for i, layers in enumerate(per_agent):
                weight = _np(layers[j].weight).T
                w[i, : weight.shape[0]] = weight
            tensors[f"layer{j}_weight"] = w
            tensors[f"layer{j}_bias"] = np.stack([_np(x[j].bias) for x in per_agent])
        head_w = np.zeros((n, linears[-1].out_features, a), dtype=np.float32)
        head_b = np.zeros((n, a), dtype=np.float32)
        for i, head in enumerate(student.heads):
            head_w[i, :, : head.out_features] = _np(head.weight).T
            head_b[i, : head.out_features] = _np(head.bias)
        tensors["head_weight"], tensors["head_bias"] = head_w, head_b
    structure = {"kind": "mlp", "per_agent": not student.shared, "layers": len(linears)}
    return ExportNetwork(structure, tensors)


def quantize_int8(network: ExportNetwork) -> ExportNetwork:
    """Store every weight matrix as int8 with one float32 scale per tensor."""
    tensors = dict(network.tensors)
    quantized = []
    matrices = [
        n for n in tensors if n.endswith("_weight") and n.startswith(("layer", "head"))
    ]
    for name in matrices:
        w = tensors.pop(name)
        top = float(np.abs(w).max())
        scale = np.float32(top / 127.0 if top > 0 else 1.0)
        tensors[f"{name}_q"] = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        tensors[f"{name}_scale"] = np.array(scale, dtype=np.float32)
        quantized.append(name)
    return ExportNetwork({**network.structure, "quantized": quantized}, tensors)


def compact(network: ExportNetwork) -> ExportNetwork:
    """Store index tensors as small integers and float tables as codes.

    Both are lossless. The agent-to-map index ``map_of`` gets the smallest
    unsigned type that holds it. A float table whose values repeat
    becomes its distinct values plus, per entry, the code of its value
    (``coded``), or, when mostly zeros, per non-zero entry its code and flat
    position (``sparse``); whichever is smallest, if smaller than the table.
    """
    tensors = dict(network.tensors)
    indices = [n for n in ("map_of",) if n in tensors]
    for name in indices:
        tensors[name] = tensors[name].astype(_smallest_uint(tensors[name].max() + 1))

    encoded = {}
    tables = (
        "feature_picker",
        "feature_values",
        "feature_selector",
        "context_share",
        "inv_scale",
    )
    for name in [n for n in tables if n in tensors]:
        dense = tensors[name]
        flat = dense.ravel()
        values, codes = np.unique(flat, return_inverse=True)
        coded = (
            values.nbytes + flat.size * np.dtype(_smallest_uint(len(values))).itemsize
        )
        nonzero = np.flatnonzero(flat)
        nz_values, nz_codes = np.unique(flat[nonzero], return_inverse=True)
        sparse = nz_values.nbytes + len(nonzero) * (
            np.dtype(_smallest_uint(len(nz_values))).itemsize
            + np.dtype(_smallest_uint(flat.size)).itemsize
        )
        if min(coded, sparse) >= dense.nbytes:
            continue
        del tensors[name]
        if sparse < coded:
            tensors[f"{name}_values"] = nz_values.astype(np.float32)
            tensors[f"{name}_codes"] = nz_codes.astype(_smallest_uint(len(nz_values)))
            tensors[f"{name}_positions"] = nonzero.astype(_smallest_uint(flat.size))
        else:
            tensors[f"{name}_values"] = values.astype(np.float32)
            tensors[f"{name}_codes"] = codes.astype(_smallest_uint(len(values)))
        encoded[name] = list(dense.shape)
    structure = {**network.structure, "indices": indices, "encoded": encoded}
    return ExportNetwork(structure, tensors)


def _smallest_uint(count: int):
    """The smallest integer type onnxruntime's Cast reads that holds 0..count-1."""
    if count <= 1 << 8:
        return np.uint8
    if count <= 1 << 16:
        return np.uint16
    return np.int32


# --------------------------------------------------------------------- onnx
class _GraphBuilder:
    """Collects ONNX nodes and initializers, naming intermediate values."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, array) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values) -> str:
        self._count += 1
        return self.const(f"const_{self._count}", np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


_FLOAT, _INT64 = 1, 7  # TensorProto data types, for Cast


def onnx_model_bytes(network: ExportNetwork, obs_size: int, num_actions: int) -> bytes:
    """The ONNX model of ``network``: obs, agent, mask in; logits, action out."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise UserError(
            "exporting ONNX needs the onnx package: `pip install 'marlkd[onnx]'`, "
            "or export with --format torchscript"
        ) from None

    g = _GraphBuilder()
    s = network.structure
    t = _graph_tensors(g, network)

    if s["kind"] == "phase":
        raw = _phase_graph(g, s, t, num_actions)
    elif s["per_agent"]:
        raw = _mlp_per_agent_graph(g, s, t)
    else:
        raw = _mlp_graph(g, s, t)

    allowed = g.op("And", "mask", g.op("Gather", t["exists"], "agent"))
    masked = g.const("masked_logit", np.array(MASKED_LOGIT, dtype=np.float32))
    logits = g.op("Where", allowed, raw, masked, out="logits")
    g.op("ArgMax", logits, out="action", axis=1, keepdims=0)

    types = {
        "float32": TensorProto.FLOAT,
        "int64": TensorProto.INT64,
        "bool": TensorProto.BOOL,
    }
    sizes = {"batch": "batch", "obs_size": obs_size, "num_actions": num_actions}

    def value_info(name, spec):
        dtype, dims = spec
        return helper.make_tensor_value_info(
            name, types[dtype], [sizes[x] for x in dims]
        )

    graph = helper.make_graph(
        g.nodes,
        "marlkd_student",
        [value_info(n, spec) for n, spec in INPUTS.items()],
        [value_info(n, spec) for n, spec in OUTPUTS.items()],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="marlkd",
        ir_version=ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _graph_tensors(g: _GraphBuilder, network: ExportNetwork) -> dict[str, str]:
    """Initializers, plus the constant nodes that decode them.

    onnxruntime evaluates nodes whose inputs are all initializers once, when
    it loads the model. Returns the graph value of each tensor by its name.
    """
    s, tensors = network.structure, network.tensors
    values = {}
    parts = set()
    for name, shape in s.get("encoded", {}).items():
        stored = {p: f"{name}_{p}" for p in ("values", "codes", "positions")}
        parts |= set(stored.values())
        codes = g.const(stored["codes"], tensors[stored["codes"]])
        codes = g.op("Cast", codes, to=_INT64)
        table = g.const(stored["values"], tensors[stored["values"]])
        entries = g.op("Gather", table, codes)
        if stored["positions"] in tensors:
            positions = g.const(stored["positions"], tensors[stored["positions"]])
            positions = g.op("Cast", positions, to=_INT64)
            zeros = g.op(
                "ConstantOfShape",
                g.ints([int(np.prod(shape))]),
                value=g.numpy_helper.from_array(np.zeros(1, dtype=np.float32)),
            )
            where = g.op("Unsqueeze", positions, g.ints([1]))
            entries = g.op("ScatterND", zeros, where, entries)
        values[name] = g.op("Reshape", entries, g.ints(shape), out=name)
    for name in s.get("quantized", []):
        parts |= {f"{name}_q", f"{name}_scale"}
        q = g.const(f"{name}_q", tensors[f"{name}_q"])
        scale = g.const(f"{name}_scale", tensors[f"{name}_scale"])
        # Cast and Mul, not DequantizeLinear: onnxruntime would fuse a
        # DequantizeLinear into an integer MatMul that quantizes activations.
        values[name] = g.op("Mul", g.op("Cast", q, to=_FLOAT), scale, out=name)
    for name in s.get("indices", []):
        parts.add(name)
        stored = g.const(f"{name}_stored", tensors[name])
        values[name] = g.op("Cast", stored, to=_INT64, out=name)
    for name, array in tensors.items():
        if name not in parts:
            values[name] = g.const(name, array)
    return values


def _per_agent(g: _GraphBuilder, value: str, rank: int) -> str:
    """A table indexed by agent row, or the value itself when it is shared."""
    return g.op("Gather", value, "agent") if rank == 2 else value


def _dense(g: _GraphBuilder, x: str, w: str, b: str, relu: bool = True) -> str:
    """x @ w + b on 2-D x, then ReLU; onnxruntime fuses the three into a Gemm."""
    h = g.op("Add", g.op("MatMul", x, w), b)
    return g.op("Relu", h) if relu else h


def _phase_graph(g, s, t, num_actions: int) -> str:
    k = s["features"]
    # Non-zero entries of the feature maps, times this agent's values.
    x = g.op("MatMul", "obs", t["feature_picker"])  # (B, P)
    values = t["feature_values"]  # (U, P); U = 1 broadcasts
    if s["maps"] > 1:
        values = g.op("Gather", values, g.op("Gather", t["map_of"], "agent"))
    f = g.op("MatMul", g.op("Mul", x, values), t["feature_selector"])  # (B, A*K)
    f = g.op("Reshape", f, g.ints([-1, num_actions, k]))

    share = g.op("Gather", t["context_share"], "agent")
    share = g.op("Unsqueeze", share, g.ints([2]))
    context = g.op("ReduceSum", g.op("Mul", f, share), g.ints([1]), keepdims=1)
    context = g.op("Expand", context, g.op("Shape", f))  # (B, A, K)
    x = g.op("Reshape", g.op("Concat", f, context, axis=2), g.ints([-1, 2 * k]))

    if s["bias_rank"] == 2:  # a bias per agent: add it per row of (B, A, H)
        h = g.op("MatMul", x, t["layer0_weight"])
        h = g.op("Reshape", h, g.ints([-1, num_actions, s["width"]]))
        bias = g.op("Gather", t["layer0_bias"], "agent")
        bias = g.op("Unsqueeze", bias, g.ints([1]))
        h = g.op("Relu", g.op("Add", h, bias))
        h = g.op("Reshape", h, g.ints([-1, s["width"]]))
    else:
        h = _dense(g, x, t["layer0_weight"], t["layer0_bias"])
    for j in range(1, s["layers"]):
        h = _dense(g, h, t[f"layer{j}_weight"], t[f"layer{j}_bias"])
    out = _dense(g, h, t["head_weight"], t["head_bias"], relu=False)  # (B*A, 1)
    return g.op("Reshape", out, g.ints([-1, num_actions]))


def _mlp_graph(g, s, t) -> str:
    x = g.op("Mul", "obs", g.op("Gather", t["inv_scale"], "agent"))
    bias = _per_agent(g, t["layer0_bias"], s["bias_rank"])
    h = _dense(g, x, t["layer0_weight"], bias)
    for j in range(1, s["layers"]):
        h = _dense(g, h, t[f"layer{j}_weight"], t[f"layer{j}_bias"])
    return _dense(g, h, t["head_weight"], t["head_bias"], relu=False)


def _mlp_per_agent_graph(g, s, t) -> str:
    x = g.op("Mul", "obs", g.op("Gather", t["inv_scale"], "agent"))
    h = g.op("Unsqueeze", x, g.ints([1]))  # (B, 1, D): one row per agent matrix

    def layer(h, name):
        w = g.op("Gather", t[f"{name}_weight"], "agent")
        b = g.op("Unsqueeze", g.op("Gather", t[f"{name}_bias"], "agent"), g.ints([1]))
        return g.op("Add", g.op("MatMul", h, w), b)

    for j in range(s["layers"]):
        h = g.op("Relu", layer(h, f"layer{j}"))
    return g.op("Squeeze", layer(h, "head"), g.ints([1]))


# -------------------------------------------------------------- torchscript
def torchscript_bytes(network: ExportNetwork, example) -> bytes:
    """``network`` as a traced TorchScript module with the ONNX graph's interface."""
    import torch

    module = _torch_module(network).eval()
    with warnings.catch_warnings():
        # Tracing is deprecated in PyTorch 2.x, but a traced module still loads
        # in libtorch (C++) without Python, which is what this format is for.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _torch_module(network: ExportNetwork):
    """A torch.nn.Module computing what the ONNX graph computes."""
    import torch
    from torch import nn

    from marlkd.runtime.numpy_net import dense_tensors

    s = network.structure
    stored = dense_tensors({**s, "quantized": []}, network.tensors)
    quantized = set(s.get("quantized", []))

    class ExportedStudent(nn.Module):
        def __init__(self):
            super().__init__()
            for name, array in stored.items():
                self.register_buffer(name, torch.from_numpy(np.array(array)))

        def w(self, name: str):
            if name in quantized:
                q = getattr(self, f"{name}_q")
                return q.float() * getattr(self, f"{name}_scale")
            return getattr(self, name)

        def dense(self, h, j: str, relu: bool = True):
            h = h @ self.w(f"{j}_weight") + getattr(self, f"{j}_bias")
            return torch.relu(h) if relu else h

        def forward(self, obs, agent, mask):
            if s["kind"] == "phase":
                raw = self.phase(obs, agent)
            elif s["per_agent"]:
                raw = self.mlp_per_agent(obs, agent)
            else:
                raw = self.mlp(obs, agent)
            allowed = mask & self.exists[agent]
            logits = torch.where(allowed, raw, torch.full_like(raw, MASKED_LOGIT))
            return logits, logits.argmax(dim=1)

        def phase(self, obs, agent):
            num_actions, k = self.exists.shape[1], s["features"]
            values = self.feature_values
            if s["maps"] > 1:
                values = values[self.map_of[agent]]
            x = (obs @ self.feature_picker) * values
            f = (x @ self.feature_selector).reshape(-1, num_actions, k)
            context = (f * self.context_share[agent].unsqueeze(2)).sum(1, True)
            x = torch.cat([f, context.expand_as(f)], dim=2).reshape(-1, 2 * k)
            if s["bias_rank"] == 2:
                h = (x @ self.w("layer0_weight")).reshape(-1, num_actions, s["width"])
                h = torch.relu(h + self.layer0_bias[agent].unsqueeze(1))
                h = h.reshape(-1, s["width"])
            else:
                h = self.dense(x, "layer0")
            for j in range(1, s["layers"]):
                h = self.dense(h, f"layer{j}")
            return self.dense(h, "head", relu=False).reshape(-1, num_actions)

        def mlp(self, obs, agent):
            x = obs * self.inv_scale[agent]
            bias = self.layer0_bias
            bias = bias[agent] if bias.dim() == 2 else bias
            h = torch.relu(x @ self.w("layer0_weight") + bias)
            for j in range(1, s["layers"]):
                h = self.dense(h, f"layer{j}")
            return self.dense(h, "head", relu=False)

        def mlp_per_agent(self, obs, agent):
            h = (obs * self.inv_scale[agent]).unsqueeze(1)
            for j in [f"layer{j}" for j in range(s["layers"])] + ["head"]:
                w = self.w(f"{j}_weight")[agent]
                h = h @ w + getattr(self, f"{j}_bias")[agent].unsqueeze(1)
                h = torch.relu(h) if j != "head" else h
            return h.squeeze(1)

    return ExportedStudent()


# ------------------------------------------------------------------- export
def agent_descriptions(layout, specs=None) -> list[dict]:
    """Per agent: name, sizes, observation layout, scale and action meanings.

    ``specs`` (the traffic environment's ``AgentSpec`` by name) gives the
    observation blocks and the green phase state strings; without it the
    blocks are empty and the actions are named by their index.
    """
    agents = []
    for entry in layout.agents:
        spec = specs[entry.name] if specs is not None else None
        slices = spec.obs_slices() if spec is not None else {}
        agents.append(
            {
                "name": entry.name,
                "obs_size": entry.obs_size,
                "num_actions": entry.num_actions,
                "obs_slices": {b: [s.start, s.stop] for b, s in slices.items()},
                "obs_scale": [float(x) for x in entry.obs_scale],
                "actions": (
                    list(spec.plan.green_states)
                    if spec is not None
                    else [str(a) for a in range(entry.num_actions)]
                ),
            }
        )
    return agents


def export_student(
    student,
    out_dir: str | Path,
    *,
    network_format: str = "onnx",
    quantize: str | None = None,
    agents: list[dict] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write ``student`` into ``out_dir`` as a network file and metadata.json.

    Args:
        student: a ``PhaseStudent`` or ``MLPStudent``.
        out_dir: the export folder; created if needed.
        network_format: "onnx" or "torchscript".
        quantize: None, or "int8" for int8 weight matrices.
        agents: ``agent_descriptions`` of the student's agents; from its
            layout alone when None.
        extra: more metadata entries (scenario, env, run).

    Returns:
        The metadata written.
    """
    if network_format not in NETWORK_FORMATS:
        raise UserError(
            f"unknown export format '{network_format}': choose one of "
            f"{', '.join(NETWORK_FORMATS)}"
        )
    if quantize not in (None, *QUANTIZE):
        raise UserError(
            f"unknown quantization '{quantize}': choose {', '.join(QUANTIZE)} or "
            "leave it out"
        )
    layout = student.layout
    out_dir = Path(out_dir)

    network = network_from_student(student)
    if quantize == "int8":
        network = quantize_int8(network)
    bias = network.tensors["layer0_bias"]
    network.structure["bias_rank"] = int(bias.ndim)
    network.structure["width"] = int(bias.shape[-1])
    network = compact(network)

    d, a = layout.max_obs_size, layout.max_actions
    file = NETWORK_FILES[network_format]
    if network_format == "onnx":
        data = onnx_model_bytes(network, d, a)
    else:
        data = torchscript_bytes(network, _example_batch(layout))
    atomic_write_bytes(out_dir / file, data)

    from marlkd import __version__

    descriptions = agents or agent_descriptions(layout)
    metadata = {
        "format": FORMAT,
        "version": EXPORT_VERSION,
        "network_format": network_format,
        "marlkd_version": __version__,
        "student": {
            "kind": student.kind,
            "config": dict(student.config),
            "parameters": int(student.num_parameters()),
        },
        "quantize": quantize,
        "padded": {"obs_size": d, "num_actions": a},
        "inputs": _signature(INPUTS, d, a),
        "outputs": _signature(OUTPUTS, d, a),
        "masked_logit": MASKED_LOGIT,
        "network": network.structure,
        "agents": [{**x, "network": file} for x in descriptions],
        **(extra or {}),
        "files": {file: {"sha256": sha256_bytes(data), "bytes": len(data)}},
    }
    metadata["checksum"] = metadata_checksum(metadata)
    atomic_write_text(out_dir / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    for stale in set(NETWORK_FILES.values()) - {file}:
        # A network of the other format, left by an earlier export here.
        (out_dir / stale).unlink(missing_ok=True)
    logger.info("exported %s (%d bytes) to %s", file, len(data), out_dir)
    return metadata


def _signature(tensors: dict, obs_size: int, num_actions: int) -> dict:
    sizes = {"batch": "batch", "obs_size": obs_size, "num_actions": num_actions}
    return {
        name: {"dtype": dtype, "shape": [sizes[x] for x in dims]}
        for name, (dtype, dims) in tensors.items()
    }


def _example_batch(layout):
    """A small batch for tracing: every agent once, all actions allowed."""
    import torch

    n = layout.num_agents
    obs = torch.ones(n, layout.max_obs_size)
    agent = torch.arange(n, dtype=torch.int64)
    mask = torch.from_numpy(layout.action_exists())
    return obs, agent, mask


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    network_format: str = "onnx",
    quantize: str | None = None,
) -> tuple[Path, dict]:
    """Export the student of a run folder; ``RUN_DIR/export`` by default.

    The metadata records the run's scenario and environment settings, so that
    ``deploy`` can run the export where it was trained.

    Returns:
        The export folder and its metadata.
    """
    from marlkd.config import load_config
    from marlkd.envs.traffic.env import TrafficSignalEnv
    from marlkd.schema import to_dict
    from marlkd.students import AgentLayout, check_layout, load_student
    from marlkd.utils import run_checkpoint

    run_dir = Path(run_dir)
    checkpoint = run_checkpoint(run_dir)
    config = load_config(run_dir / "config.yaml")
    student = load_student(checkpoint)

    env = TrafficSignalEnv(config.scenario.build(), config.env)
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, config.env.max_green)
        check_layout(student.layout, layout)
        agents = agent_descriptions(student.layout, env.specs)
    finally:
        env.close()

    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    metadata = export_student(
        student,
        out_dir,
        network_format=network_format,
        quantize=quantize,
        agents=agents,
        extra={
            "run": str(run_dir.resolve()),
            "scenario": to_dict(config.scenario),
            "env": to_dict(config.env),
        },
    )
    return out_dir, metadata


# ------------------------------------------------------------------- deploy
def check_export_fits(runtime, env) -> None:
    """Check that the export acts for exactly the environment's signals.

    Raises:
        UserError: an agent missing from either side, or one whose
            observation size, action count or phases differ.
    """
    exported = {a["name"]: a for a in runtime.metadata["agents"]}
    problems = []
    missing = [a for a in env.possible_agents if a not in exported]
    if missing:
        problems.append(f"no student for signal(s) {', '.join(missing[:3])}")
    for name in env.possible_agents:
        if name not in exported:
            continue
        entry, spec = exported[name], env.specs[name]
        if entry["obs_size"] != spec.obs_size:
            problems.append(
                f"'{name}' observes {spec.obs_size} values here, "
                f"{entry['obs_size']} in the export"
            )
        elif entry["actions"] != list(spec.plan.green_states):
            problems.append(f"'{name}' has other green phases here")
    if problems:
        listed = "; ".join(problems[:3])
        raise UserError(
            f"the export in {runtime.export_dir} does not fit this scenario's "
            f"signals ({listed}): deploy it on the scenario it was trained on, or "
            "export a student trained for this one"
        )


def deploy(
    export_dir: str | Path,
    *,
    scenario=None,
    env_config=None,
    episodes: int = 1,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Run an export as every signal's controller and measure the traffic.

    Args:
        export_dir: the folder ``marlkd export`` wrote.
        scenario: the scenario to run; the export's recorded one when None.
        env_config: environment settings; the export's recorded ones when None.
        episodes: episodes on seeds ``seed, seed + 1, ...``.
        backend: the runtime backend (see ``marlkd.runtime``).

    Returns:
        What ``marlkd simulate`` reports: scenario, controller, signals,
        per-episode figures and their mean; plus the export and backend.
    """
    from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
    from marlkd.evaluate import simulate
    from marlkd.runtime import Runtime
    from marlkd.schema import from_dict

    if episodes < 1:
        raise UserError(f"--episodes is {episodes}: run at least 1 episode")
    runtime = Runtime.load(export_dir, backend=backend)
    metadata = runtime.metadata
    if scenario is None:
        if "scenario" not in metadata:
            raise UserError(
                f"{export_dir} records no scenario: name one with --scenario, "
                "--net/--routes or --sumocfg"
            )
        from marlkd.config import ScenarioConfig

        recorded = from_dict(ScenarioConfig, metadata["scenario"], "scenario")
        scenario = recorded.build()
    if env_config is None:
        env_config = from_dict(TrafficEnvConfig, metadata.get("env", {}), "env")
        env_config.validate()

    env = TrafficSignalEnv(scenario, env_config)
    try:
        check_export_fits(runtime, env)
        result = simulate(env, runtime, episodes=episodes, seed=seed, progress=progress)
    finally:
        env.close()
    return {
        "scenario": scenario.name,
        "controller": "student",
        "signals": len(env.possible_agents),
        "export": str(export_dir),
        "network_format": metadata["network_format"],
        "quantize": metadata.get("quantize"),
        "backend": runtime.backend,
        **result,
    }


# ---------------------------------------------------------------------- cli
def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``marlkd export``."""
    parser.add_argument("run_dir", help="the run folder written by `marlkd distill`")
    parser.add_argument(
        "--format",
        dest="format",
        choices=NETWORK_FORMATS,
        default="onnx",
        help="network file format (default onnx; the torch-free runtime needs it)",
    )
    parser.add_argument("--out", help="export folder (default RUN_DIR/export)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        help="store weight matrices as int8, one float scale per matrix (a quarter "
        "of their bytes)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    out_dir, metadata = export_run(
        args.run_dir, args.out, network_format=args.format, quantize=args.quantize
    )
    student = metadata["student"]
    quantized = f", {metadata['quantize']}" if metadata["quantize"] else ""
    print(
        f"exported the {student['kind']} student ({student['parameters']} "
        f"parameters{quantized}) for {len(metadata['agents'])} agents to {out_dir}"
    )
    for name, entry in metadata["files"].items():
        print(f"  {name}  {entry['bytes']} bytes  sha256 {entry['sha256'][:16]}...")
    print(f"  {METADATA_FILE}")
    return 0


def add_deploy_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``marlkd deploy``: the export, then those of ``marlkd simulate``."""
    from marlkd.cli import add_scenario_args

    parser.description = (
        "Run an exported student as every signal's controller. Without "
        "--scenario, --net/--routes or --sumocfg it runs the scenario recorded in "
        "the export, with the recorded environment settings; flags override them."
    )
    parser.add_argument("export_dir", help="the folder written by `marlkd export`")
    add_scenario_args(parser)
    parser.add_argument(
        "--episodes", type=int, default=1, help="episodes to run (default 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the first episode; then +1 each"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "numpy", "onnxruntime", "torchscript"),
        default="auto",
        help="how the network runs (default auto: numpy for one agent alone, "
        "onnxruntime for batches)",
    )
    parser.add_argument(
        "--json", help="write per-episode and mean metrics to this file"
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    """``marlkd deploy``: the recorded scenario unless scenario flags name one."""
    from marlkd.cli import env_config_from_args, scenario_from_args, write_json
    from marlkd.envs.traffic.env import TrafficEnvConfig
    from marlkd.evaluate import format_table
    from marlkd.runtime.metadata import read_export
    from marlkd.schema import from_dict

    metadata, _ = read_export(args.export_dir)
    scenario = None
    if args.scenario or args.net or args.routes or args.sumocfg:
        scenario = scenario_from_args(args)
    elif args.begin is not None or args.end is not None:
        raise UserError("--begin and --end apply to --net/--routes scenarios only")
    base = from_dict(TrafficEnvConfig, metadata.get("env", {}), "env")
    env_config = env_config_from_args(args, base=base)

    result = deploy(
        args.export_dir,
        scenario=scenario,
        env_config=env_config,
        episodes=args.episodes,
        seed=args.seed,
        backend=args.backend,
    )
    rows = [(f"seed {e['seed']}", e) for e in result["episodes"]]
    rows.append(("mean", result["mean"]))
    print(
        f"exported student ({result['network_format']}, {result['backend']}) on "
        f"{result['scenario']} ({result['signals']} signals)"
    )
    print(format_table(rows))
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0
