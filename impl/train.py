"""A tiny seeded LoRA SFT loop and a synthetic memorization task ("codenames"), reusable by checks and scripts.

    make_codename_task(vocab_size, n_prompts, prompt_len, cont_len, n_heldout, seed) -> CodenameTask
    train_lora(model, task, steps, lr, seed)            -> TrainResult (per-step losses, seconds)
    peak_rss_of(fn)                                     -> (result, peak RSS bytes during fn, RSS before)

The task: P random prompts (distinct token patterns) each followed by a fixed random continuation. The loss is the
causal-LM loss on the continuation tokens only (prompt positions are labelled -100), so a model that has learned the
task drives it towards 0 from about ln(vocab). Held-out prompts (never trained on) are for distribution checks.

Everything is seeded: the same seed gives the same task, the same batch order (full batch, every step) and the
same optimizer trajectory on the same machine and thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
RESERVED_TOKENS = 3  # ids 0, 1, 2 are pad / bos / eos in the zoo configs; the task never uses them


@dataclass(frozen=True)
class CodenameTask:
    """prompts [P, Lp], continuations [P, Lc], heldout [Q, Lp] (int64 token ids)."""

    prompts: torch.Tensor
    continuations: torch.Tensor
    heldout: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """``[P, Lp + Lc]``: prompt then continuation."""
        return torch.cat([self.prompts, self.continuations], dim=1)

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` with the prompt positions set to -100 (the loss covers the continuation only)."""
        labels = self.input_ids.clone()
        labels[:, : self.prompts.shape[1]] = IGNORE_INDEX
        return labels


def _distinct_rows(gen: torch.Generator, n: int, length: int, low: int, high: int) -> torch.Tensor:
    """``n`` pairwise-distinct random rows of token ids in ``[low, high)``; raises if the space is too small."""
    if (high - low) ** length < 4 * n:
        raise ValueError(f"cannot draw {n} distinct rows of length {length} from {high - low} tokens")
    rows: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(rows) < n:
        row = tuple(torch.randint(low, high, (length,), generator=gen).tolist())
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def make_codename_task(
    vocab_size: int,
    n_prompts: int = 8,
    prompt_len: int = 6,
    cont_len: int = 6,
    n_heldout: int = 4,
    seed: int = 0,
) -> CodenameTask:
    """A seeded memorization task; prompts and held-out prompts are all distinct; ids avoid pad/bos/eos."""
    if vocab_size <= RESERVED_TOKENS + 1:
        raise ValueError(f"vocab_size {vocab_size} too small (ids 0..{RESERVED_TOKENS - 1} are reserved)")
    gen = torch.Generator().manual_seed(seed)
    all_prompts = _distinct_rows(gen, n_prompts + n_heldout, prompt_len, RESERVED_TOKENS, vocab_size)
    continuations = torch.randint(RESERVED_TOKENS, vocab_size, (n_prompts, cont_len), generator=gen)
    return CodenameTask(all_prompts[:n_prompts], continuations, all_prompts[n_prompts:])


@dataclass
class TrainResult:
    """Per-step training losses (float, before the update of that step) and the wall time of the loop."""

    losses: list[float]
    seconds: float

    @property
    def initial(self) -> float:
        return self.losses[0]

    @property
    def final(self) -> float:
        return self.losses[-1]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad`` (the LoRA factors of a PEFT model); raises if there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (was a LoRA adapter added?)")
    return params


def train_step(model: torch.nn.Module, task: CodenameTask, optimizer: torch.optim.Optimizer) -> float:
    """One full-batch step: forward with labels, backward, optimizer step; returns the loss before the update."""
    out = model(input_ids=task.input_ids, labels=task.labels)
    loss = out.loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()}")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach().float())


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay over the trainable parameters (deterministic: no fused/foreach variants)."""
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0, foreach=False)


def train_lora(
    model: torch.nn.Module, task: CodenameTask, *, steps: int, lr: float = 1e-2, seed: int = 0
) -> TrainResult:
    """Train the trainable parameters of ``model`` (a PEFT LoRA model) on ``task`` for ``steps`` full-batch steps.

    The learning rate follows a cosine decay from ``lr`` to 0 over ``steps``. The model is put in train mode for the
    loop and back in eval mode after. ``seed`` seeds torch's global RNG
    before the loop (nothing in the loop draws from it today: dropout is 0 in LoRA on parameters; seeded anyway).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, lr)
    # Cosine decay to 0: at a constant lr of 1e-2 Adam keeps taking full-size steps after the loss has converged
    # (~0.05 nats) and the curve spikes late (seen: Mixtral bf16 0.05 -> 0.29 in the last 5 of 100 steps on an
    # AVX-512 CPU, not on another), which makes the final loss a coin toss of the hardware's rounding.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(train_step(model, task, optimizer))
        schedule.step()
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(losses, seconds)


# --- peak RSS ------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_rss_of(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run ``fn()``; return ``(result, peak RSS in bytes while it ran, RSS in bytes before)``.

    Linux only: the process's high-water mark (VmHWM) is reset by writing 5 to ``/proc/self/clear_refs`` before the
    call, then read after it. The peak includes everything resident (interpreter, torch, the model), so the
    increment ``peak - before`` is the part attributable to ``fn``.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS") * 1024
    result = fn()
    peak = _status_kb("VmHWM") * 1024
    return result, peak, before
