"""The expert policy in torch: the only learned part of a Badger agent.

One GRU cell and one linear layer of heads, shared by every expert. Its input is
the expert's inbox (routed messages) and what it sensed through the membrane; its
output is the expert's new state and its heads (routing query/key, message value,
'done' vote, read queries, push key and value). The GRU keeps every state entry in
(-1, 1) by construction (a convex mix of the old state and a tanh), whatever the
input, for as long as the agent runs.

Everything else in the inner loop (routing, agreement, membrane) is the shared
math in ``badger_runtime.rollout``, run here with torch ops.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import PolicySpec
from ..xp import TorchOps
from .fused_gru import policy_step


class ExpertPolicy(nn.Module):
    #: run the GRU cell and the heads as one autograd node (``fused_gru.policy_step``: the same function,
    #: fewer elementwise passes); an ONNX export, a trace or torch.compile always sees ``nn.GRUCell``'s ops.
    #: ``BADGER_FUSED=0`` runs ``nn.GRUCell`` in training too, as the policies shipped before session 37 were
    #: trained (the fused step agrees to ~3e-7 per step, which a long training amplifies)
    fused: bool = os.environ.get("BADGER_FUSED", "1") != "0"

    def __init__(self, spec: PolicySpec):
        super().__init__()
        self.spec = spec
        self.cell = nn.GRUCell(spec.msg_dim + spec.sensed_dim, spec.hidden)
        self.heads = nn.Linear(spec.hidden, spec.heads_dim)
        self.h0 = nn.Parameter(torch.zeros(spec.hidden))
        nn.init.normal_(self.heads.weight, std=0.5 / spec.hidden**0.5)
        nn.init.zeros_(self.heads.bias)

    def forward(self, state, inbox, sensed):
        x = torch.cat([inbox, sensed], dim=-1)
        if self.fused and x.dim() == 2 and not (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
                                                or torch.compiler.is_compiling()):
            return policy_step(self.cell, self.heads, x, state)
        h = self.cell(x, state)
        return h, self.heads(h)

    def step(self, h, inbox, sensed):
        return self(h, inbox, sensed)


def torch_ops() -> TorchOps:
    return TorchOps(torch)
