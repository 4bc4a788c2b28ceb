"""Shared pytest configuration: hypothesis profiles and the offline guard."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# Triton decides interpreter vs compiled mode when a kernel is decorated, i.e. when impl.ops is first imported —
# which may be from any test module. Without a GPU the kernels can only run interpreted, so decide it here, before
# any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `ci`: derandomized (same inputs every run), no deadline (a 2-core CI box is slow and noisy), no example DB.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# `dev`: random exploration with more examples, for a person hunting bugs locally.
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
