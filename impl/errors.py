"""Errors of the on-disk tools (merge, adapter and sidecar reading). Checkpoint errors are `impl.checkpoint`'s."""

from reference.layout import LayoutError


class MergeError(RuntimeError):
    """A merge that cannot be done correctly (bad adapter, base/adapter mismatch, unapplied tensors, ...)."""


class AdapterError(MergeError):
    """An adapter directory or config the merge does not support, or whose tensors contradict its config."""


class OrientationError(AdapterError, LayoutError):
    """An adapter whose expert LoRA orientation is undecidable, or whose orientation sources disagree
    (`reference.layout.decide_orientation`); both an AdapterError and a LayoutError."""
