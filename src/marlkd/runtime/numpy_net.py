"""The exported network evaluated with numpy, from the ONNX file's own weights.

For a handful of agents, onnxruntime's fixed cost per call outweighs the
network itself; this path runs the same computation as the ONNX graph with a
few numpy calls. The weights come from the graph's initializers (decoded and
dequantized here as the graph's constant nodes do), so the two paths share one
source of truth. For a batch of rows, with i a row's agent:

phase (one network scores every action from K features of it):

    F = ((obs @ picker) * values[map of i]) @ selector    as (A, K)
    c = sum_a context_share[i, a] F[a]            mean over i's actions
    h = relu([F_a, c] @ W_0 + b_i), then relu(h @ W_j + b_j) per layer
    logit_a = h_a @ w + b

mlp (shared, or ``per_agent`` with one set of weights per agent):

    h = relu((obs * inv_scale[i]) @ W_0 + b_0), then hidden layers
    logits = h @ W_head + b_head

and masks every action the agent lacks or may not take now with MASKED_LOGIT.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MASKED_LOGIT = float(np.finfo(np.float32).min / 2)
"""The logit of a masked action, as the students give it."""


def dense_tensors(network: dict, initializers: dict[str, np.ndarray]) -> dict:
    """The network's tensors as plain arrays, as the graph's constant nodes make them.

    An index tensor is stored as small unsigned integers (``x_stored``) and read
    as int64. An encoded table ``x`` is ``x_values`` (distinct values) and
    ``x_codes`` (per entry, or with ``x_positions`` per non-zero entry, the
    index of its value). A quantized weight ``w`` is ``w_q`` (int8) and
    ``w_scale`` (float32): w = w_q * w_scale.
    """
    tensors = dict(initializers)
    for name in network.get("indices", []):
        tensors[name] = tensors.pop(f"{name}_stored", tensors.get(name)).astype(
            np.int64
        )
    for name, shape in network.get("encoded", {}).items():
        values = tensors.pop(f"{name}_values")
        entries = values[tensors.pop(f"{name}_codes").astype(np.int64)]
        positions = tensors.pop(f"{name}_positions", None)
        if positions is not None:
            flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
            flat[positions.astype(np.int64)] = entries
            entries = flat
        tensors[name] = entries.reshape(shape)
    for name in network.get("quantized", []):
        q = tensors.pop(f"{name}_q")
        scale = tensors.pop(f"{name}_scale")
        tensors[name] = q.astype(np.float32) * scale
    return tensors


class NumpyNetwork:
    """The exported student as numpy arrays.

    Args:
        network: the ``network`` entry of the export's metadata.
        tensors: its tensors, from ``dense_tensors``.
        obs_sizes: every agent's observation size, in index order.
        num_actions: every agent's number of actions, in index order.
    """

    KINDS = ("phase", "mlp")

    def __init__(
        self,
        network: dict,
        tensors: dict[str, np.ndarray],
        obs_sizes: list[int],
        num_actions: list[int],
    ):
        self.kind = network["kind"]
        if self.kind not in self.KINDS:
            raise NotImplementedError(
                f"the numpy path has no {self.kind!r} network; use onnxruntime"
            )
        self.per_agent = bool(network.get("per_agent", False))
        self.t = tensors
        self.obs_sizes = list(obs_sizes)
        self.num_actions = list(num_actions)
        self.exists = tensors["exists"].astype(bool)
        self.num_hidden = int(network["layers"])
        self.features = int(network.get("features", 0))
        self.t_obs_size = max(self.obs_sizes)
        self._policies: dict[int, Callable] = {}

    # ---------------------------------------------------------------- batch
    def run(
        self, obs: np.ndarray, agent: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, A_max) and actions (B,) of a padded batch."""
        if self.kind == "phase":
            raw = self._phase(obs, agent)
        elif self.per_agent:
            raw = self._mlp_per_agent(obs, agent)
        else:
            raw = self._mlp(obs, agent)
        allowed = mask & self.exists[agent]
        logits = np.where(allowed, raw, np.float32(MASKED_LOGIT))
        return logits, logits.argmax(axis=1)

    def _bias(self, name: str, agent: np.ndarray) -> np.ndarray:
        bias = self.t[name]
        return bias[agent] if bias.ndim == 2 else bias

    def _hidden(self, h: np.ndarray) -> np.ndarray:
        for j in range(1, self.num_hidden):
            h = h @ self.t[f"layer{j}_weight"]
            h += self.t[f"layer{j}_bias"]
            np.maximum(h, 0, out=h)
        return h

    def _phase(self, obs, agent):
        t = self.t
        b = len(agent)
        num_actions, k = self.exists.shape[1], self.features
        values = t["feature_values"]
        if "map_of" in t:
            values = values[t["map_of"][agent]]
        x = (obs @ t["feature_picker"]) * values
        f = (x @ t["feature_selector"]).reshape(b, num_actions, k)
        context = (f * t["context_share"][agent][:, :, None]).sum(axis=1)
        x = np.concatenate(
            [f, np.broadcast_to(context[:, None, :], f.shape)], axis=2
        ).reshape(b * num_actions, 2 * k)
        h = x @ t["layer0_weight"]
        bias = t["layer0_bias"]
        if bias.ndim == 2:
            h = h.reshape(b, num_actions, -1)
            h += bias[agent][:, None, :]
            h = h.reshape(b * num_actions, -1)
        else:
            h += bias
        np.maximum(h, 0, out=h)
        h = self._hidden(h)
        return (h @ t["head_weight"] + t["head_bias"]).reshape(b, num_actions)

    def _mlp(self, obs, agent):
        t = self.t
        h = (obs * t["inv_scale"][agent]) @ t["layer0_weight"]
        h += self._bias("layer0_bias", agent)
        np.maximum(h, 0, out=h)
        h = self._hidden(h)
        return h @ t["head_weight"] + t["head_bias"]

    def _mlp_per_agent(self, obs, agent):
        t = self.t
        raw = np.zeros((len(agent), self.exists.shape[1]), dtype=np.float32)
        for i in np.unique(agent):
            rows = agent == i
            h = obs[rows] * t["inv_scale"][i]
            for j in range(self.num_hidden):
                h = h @ t[f"layer{j}_weight"][i] + t[f"layer{j}_bias"][i]
                np.maximum(h, 0, out=h)
            raw[rows] = h @ t["head_weight"][i] + t["head_bias"][i]
        return raw

    # ------------------------------------------------------------ one agent
    def policy(self, i: int) -> Callable[[np.ndarray, np.ndarray], int]:
        """A function (obs, mask) -> action for agent ``i`` alone, unpadded.

        Its arrays are cut to the agent's own observation and actions, and the
        phase student's first layer, linear in the observation, is folded with
        its feature map into one matrix, so a decision is about a dozen numpy
        calls.
        """
        if i not in self._policies:
            build = self._phase_policy if self.kind == "phase" else self._mlp_policy
            self._policies[i] = build(i)
        return self._policies[i]

    def _layers(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight, bias) of hidden layers 1.. as agent ``i`` uses them."""
        layers = []
        for j in range(1, self.num_hidden):
            w, b = self.t[f"layer{j}_weight"], self.t[f"layer{j}_bias"]
            layers.append((w[i], b[i]) if self.per_agent else (w, b))
        return layers

    def _phase_policy(self, i: int):
        t = self.t
        d, a, k = self.obs_sizes[i], self.num_actions[i], self.features
        u = int(t["map_of"][i]) if "map_of" in t else 0
        # This agent's own map, dense: (obs entries, actions, features).
        num_actions = self.exists.shape[1]
        columns = t["feature_selector"].argmax(axis=1)
        fmap = np.zeros((self.t_obs_size, num_actions * k), np.float32)
        fmap[t["feature_picker"].argmax(axis=0), columns] = t["feature_values"][u]
        fmap = fmap.reshape(-1, num_actions, k)[:d, :a]
        # The first layer is linear in the observation: fold the map, the
        # context mean and the layer into one (d, a * H + H) matrix.
        w0 = t["layer0_weight"]
        share = t["context_share"][i, :a]
        per_action = np.einsum("dak,kh->dah", fmap, w0[:k]).reshape(d, -1)
        context = np.einsum("dak,a,kh->dh", fmap, share, w0[k:])
        first = np.ascontiguousarray(np.concatenate([per_action, context], axis=1))
        width = w0.shape[1]
        split = a * width
        b0 = t["layer0_bias"][i] if t["layer0_bias"].ndim == 2 else t["layer0_bias"]
        layers = self._layers(i)
        head_w, head_b = t["head_weight"][:, 0].copy(), t["head_bias"][0]
        minus_inf = -np.inf

        def act(obs: np.ndarray, mask: np.ndarray) -> int:
            z = obs @ first
            h = z[:split].reshape(a, width)
            h += z[split:] + b0
            np.maximum(h, 0, out=h)
            for w, b in layers:
                h = h @ w
                h += b
                np.maximum(h, 0, out=h)
            return int(np.where(mask, h @ head_w + head_b, minus_inf).argmax())

        return act

    def _mlp_policy(self, i: int):
        t = self.t
        d, a = self.obs_sizes[i], self.num_actions[i]
        scale = t["inv_scale"][i, :d].copy()
        if self.per_agent:
            w0 = t["layer0_weight"][i, :d].copy()
            head_w = t["head_weight"][i][:, :a].copy()
            head_b = t["head_bias"][i, :a].copy()
        else:
            w0 = t["layer0_weight"][:d].copy()
            head_w = t["head_weight"][:, :a].copy()
            head_b = t["head_bias"][:a].copy()
        b0 = t["layer0_bias"][i] if t["layer0_bias"].ndim == 2 else t["layer0_bias"]
        layers = self._layers(i)
        minus_inf = -np.inf

        def act(obs: np.ndarray, mask: np.ndarray) -> int:
            h = (obs * scale) @ w0
            h += b0
            np.maximum(h, 0, out=h)
            for w, b in layers:
                h = h @ w
                h += b
                np.maximum(h, 0, out=h)
            return int(np.where(mask, h @ head_w + head_b, minus_inf).argmax())

        return act
