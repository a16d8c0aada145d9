"""The expert policy in numpy, from a flat parameter vector: what evolution strategies perturbs.

``training.model.ExpertPolicy`` (torch) is one ``GRUCell`` and one linear layer of heads plus the
learned mean initial state ``h0``. Here the same maths runs in numpy on a flat float32 vector
laid out as the torch ``state_dict`` (``LAYOUT``), so an ES worker needs neither torch nor an
ONNX export to score a candidate: it builds ``NumpyPolicy(spec, theta)`` and runs it in the
deploy engine (``engine.Agent`` / ``evaluation.run_episodes``), the code that serves the policy.
tests/test_cluster.py checks it against the torch model and the exported ONNX graph.

``PopulationPolicy`` holds P parameter vectors at once and steps an engine batch of P x E
episodes (member m owns episodes [m E, (m + 1) E)): one batched matmul per GRU gate for the
whole population, so one ``engine.Agent`` step scores every candidate of a generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import AgentConfig, PolicySpec, TaskConfig


def layout(spec: PolicySpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in the torch ``state_dict`` order of ``ExpertPolicy``."""
    H, inp, hd = spec.hidden, spec.msg_dim + spec.sensed_dim, spec.heads_dim
    return [("h0", (H,)), ("cell.weight_ih", (3 * H, inp)), ("cell.weight_hh", (3 * H, H)),
            ("cell.bias_ih", (3 * H,)), ("cell.bias_hh", (3 * H,)), ("heads.weight", (hd, H)),
            ("heads.bias", (hd,))]


def offsets(spec: PolicySpec) -> dict[str, int]:
    """Where each named parameter starts in the flat vector."""
    out, i = {}, 0
    for name, shape in layout(spec):
        out[name] = i
        i += int(np.prod(shape))
    return out


def n_params(spec: PolicySpec) -> int:
    return sum(int(np.prod(s)) for _, s in layout(spec))


def unflatten(spec: PolicySpec, theta: np.ndarray) -> dict[str, np.ndarray]:
    """Views of ``theta`` ([D] or [P, D]) as the named parameters ([...] or [P, ...])."""
    theta = np.asarray(theta, np.float32)
    lead = theta.shape[:-1]
    if theta.shape[-1] != n_params(spec):
        raise ValueError(f"a policy of these sizes has {n_params(spec)} parameters, got {theta.shape[-1]}")
    out, i = {}, 0
    for name, shape in layout(spec):
        k = int(np.prod(shape))
        out[name] = theta[..., i:i + k].reshape(*lead, *shape)
        i += k
    return out


def flatten(params: dict) -> np.ndarray:
    """A flat float32 vector from named parameters (numpy arrays or torch tensors), in ``layout`` order."""
    names = [n for n, _ in _LAYOUT_NAMES]
    missing = set(names) - set(params)
    if missing:
        raise ValueError(f"parameters {sorted(missing)} are missing")
    return np.concatenate([np.asarray(_numpy(params[n]), np.float32).ravel() for n in names])


_LAYOUT_NAMES = layout(PolicySpec())  # the names (sizes do not matter)


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # stable for any x


def gru_heads(p: dict, h, inbox, sensed):
    """torch.nn.GRUCell (gates r, z, n) then the heads layer, on rows h [M, H] (one parameter set)
    or [P, M, H] (P sets, ``p`` stacked [P, ...])."""
    x = np.concatenate([inbox, sensed], axis=-1)
    wi, wh = np.swapaxes(p["cell.weight_ih"], -1, -2), np.swapaxes(p["cell.weight_hh"], -1, -2)
    bi, bh = p["cell.bias_ih"][..., None, :], p["cell.bias_hh"][..., None, :]
    if h.ndim == 2:
        bi, bh = bi[0], bh[0]
    gi = np.matmul(x, wi) + bi
    gh = np.matmul(h, wh) + bh
    H = h.shape[-1]
    r = _sigmoid(gi[..., :H] + gh[..., :H])
    z = _sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
    n = np.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
    h2 = ((1.0 - z) * n + z * h).astype(np.float32)
    hb = p["heads.bias"][..., None, :] if h.ndim == 3 else p["heads.bias"]
    heads = (np.matmul(h2, np.swapaxes(p["heads.weight"], -1, -2)) + hb).astype(np.float32)
    return h2, heads


@dataclass
class NumpyPolicy:
    """One expert policy from a flat vector: ``spec``, ``h0``, ``step(h, inbox, sensed)`` as the
    ONNX policy (``policy_card.OnnxPolicy``), with ``agent`` and ``task`` (what it trains on)."""

    spec: PolicySpec
    theta: np.ndarray
    agent: AgentConfig | None = None
    task: TaskConfig | None = None
    name: str = "numpy-policy"
    horizon: int | None = None  # never refuses a step (ES scores whole training episodes)
    card: dict = field(default_factory=dict)

    def __post_init__(self):
        self.theta = np.ascontiguousarray(self.theta, np.float32)
        self.params = unflatten(self.spec, self.theta)
        self.h0 = self.params["h0"]

    def step(self, h, inbox, sensed):
        return gru_heads(self.params, np.asarray(h, np.float32), np.asarray(inbox, np.float32),
                         np.asarray(sensed, np.float32))


class PopulationPolicy:
    """P policies (``thetas`` [P, D]) stepping an engine batch of P x ``episodes`` episodes, member m
    owning episodes [m E, (m + 1) E) (so rows [m E N, (m + 1) E N) of each policy call).

    ``h0`` is [P E, 1, H] (each episode its member's initial state), which ``rollout.initial_state``
    and ``rollout.grow`` broadcast over the experts."""

    def __init__(self, spec: PolicySpec, thetas: np.ndarray, episodes: int):
        self.spec = spec
        self.thetas = np.ascontiguousarray(np.atleast_2d(thetas), np.float32)
        self.P, self.E = self.thetas.shape[0], int(episodes)
        self.params = unflatten(spec, self.thetas)
        self.h0 = np.repeat(self.params["h0"], self.E, axis=0)[:, None, :]
        self.horizon = None

    def step(self, h, inbox, sensed):
        M = h.shape[0]
        if M % self.P:
            raise ValueError(f"{M} policy rows do not split into {self.P} members")
        g = lambda a: np.asarray(a, np.float32).reshape(self.P, M // self.P, -1)  # noqa: E731
        h2, heads = gru_heads(self.params, g(h), g(inbox), g(sensed))
        return h2.reshape(M, -1), heads.reshape(M, -1)


__all__ = ["NumpyPolicy", "PopulationPolicy", "flatten", "gru_heads", "layout", "n_params", "offsets", "unflatten"]
