"""The membrane: the agent's skin between the environment and its experts.

Inputs come as *slots*: each has an address (a vector; its first two entries flag
the slot's kind: observation or feedback) and a scalar value. Every expert reads
the slots through ``read_heads`` attention heads (its read queries against the
slot addresses), so the number of inputs may change between episodes.

Outputs: each output dimension i has an address b_i. Every expert pushes a key
k_e and a value (c_e, u_e); dimension i takes the attention-weighted mix over
experts of c_e + u_e . b_i. So d outputs can be 1 or 100 with the same policy,
and one expert can still drive several dimensions with different values.
"""

from __future__ import annotations

from .xp import scaled_dot, softmax

KIND_OBSERVATION = 0
KIND_FEEDBACK = 1
N_KIND_FLAGS = 2


def sense(ops, read_query, slot_addr, slot_val, visible=None):
    """Read the input slots.

    read_query: [B, N, K*A]; slot_addr: [B, J, A]; slot_val: [B, J];
    visible: [B or 1, N, J] bool (which expert may see which slot) or None.
    Returns sensed [B, N, K*(1+A)] = per head (read value, read address).
    """
    B, N, KA = read_query.shape
    A = slot_addr.shape[-1]
    K = KA // A
    q = read_query.reshape(B, N * K, A)
    scores = scaled_dot(ops, q, slot_addr).reshape(B, N, K, -1)
    mask = None if visible is None else visible[:, :, None, :]
    w = softmax(ops, scores, mask, axis=-1)  # [B, N, K, J]
    w2 = w.reshape(B, N * K, -1)
    val = ops.matmul(w2, slot_val[:, :, None]).reshape(B, N, K, 1)
    addr = ops.matmul(w2, slot_addr).reshape(B, N, K, A)
    return ops.concat([val, addr], axis=-1).reshape(B, N, K * (1 + A))


def push(ops, push_key, push_value, out_addr, can_push=None):
    """Collect the outputs.

    push_key: [B, N, A]; push_value: [B, N, 1+A]; out_addr: [B, d, A];
    can_push: [B or 1, N] bool or None.
    Returns (outputs [B, d], weights [B, d, N]).
    """
    scores = scaled_dot(ops, out_addr, push_key)  # [B, d, N]
    mask = None if can_push is None else can_push[:, None, :]
    w = softmax(ops, scores, mask, axis=-1)
    c = push_value[..., :1]  # [B, N, 1]
    u = push_value[..., 1:]  # [B, N, A]
    per_expert = ops.swap(c) + ops.matmul(out_addr, ops.swap(u))  # [B, d, N]
    return ops.sum(w * per_expert, axis=-1), w
