"""Greedy generation and next-token distribution helpers for tiny causal LMs (no KV cache; exact and simple).

    greedy(model, prompts, k)             -> [P, k] token ids (argmax, full recompute each step)
    next_token_logprobs(model, prompts)   -> [P, V] float64 log-softmax of the last position
    kl_divergence(logp, logq)             -> [P] KL(p || q) in nats
    exact_match(a, b)                     -> [P] bool, rows equal
    set_overlap(a, b)                     -> [P] |set(a_i) ∩ set(b_i)| / max(|set(a_i)|, |set(b_i)|)

The models are tiny (vocab ~128, a few dozen positions), so recomputing the whole sequence per token costs little
and avoids any dependence on the cache classes that change between transformers versions.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def _last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits[:, -1, :].to(torch.float64)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy continuation of ``prompts [P, L]`` by ``k`` tokens; returns the ``[P, k]`` new ids.

    Ties in argmax are broken by the lowest id (``torch.argmax`` on CPU), the same for every model.
    """
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [P, L], got {tuple(prompts.shape)}")
    ids = prompts
    for _ in range(k):
        nxt = _last_logits(model, ids).argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompts.shape[1] :]


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """``[P, V]`` float64 log-probabilities of the token following each prompt."""
    return torch.log_softmax(_last_logits(model, prompts), dim=-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p || q) = Σ p (log p − log q)`` in nats, from log-probabilities ``[P, V]`` (float64)."""
    if logp.shape != logq.shape:
        raise ValueError(f"shape mismatch {tuple(logp.shape)} vs {tuple(logq.shape)}")
    p = logp.exp()
    return (p * (logp - logq)).sum(dim=-1)


def exact_match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: row i of ``a`` equals row i of ``b`` (same length required)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a == b).all(dim=1)


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[P]`` float: ``|set(a_i) ∩ set(b_i)| / max(|set(a_i)|, |set(b_i)|)``, the token-set overlap of two rows.

    1.0 iff the rows hold the same set of tokens (any order, repeats ignored); prior art reports the unnormalised
    ``|set(live_k) ∩ set(merged_k)|`` of live vs merged-reload generations.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    vals = []
    for x, y in zip(a, b):
        sx, sy = set(x.tolist()), set(y.tolist())
        vals.append(len(sx & sy) / max(len(sx), len(sy), 1))
    return torch.tensor(vals, dtype=torch.float64)
