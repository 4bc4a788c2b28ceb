"""Which Triton kernels ran: a record of launches, for the tests that assert the model reached the kernels.

Every top-level kernel of `impl.ops` is defined as ``@tracked`` over ``@triton.jit``; a launch ``kernel[grid](...)``
appends the kernel's name to each list opened by `record_launches` (nothing is recorded, and nothing but one
emptiness check is paid, when none is open). Works on CUDA and under ``TRITON_INTERPRET=1``.

    with record_launches() as names:
        model(ids).loss.backward()
    assert "_grouped_gemm_kernel" in names
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_OPEN: list[list[str]] = []


class tracked:  # noqa: N801  (used as a decorator)
    """A Triton kernel whose launches are recorded; ``kernel[grid](*args)`` as for the wrapped kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.__name__ = kernel.fn.__name__
        self.__doc__ = kernel.fn.__doc__

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        if not _OPEN:
            return launch

        def run(*args, **kwargs):
            out = launch(*args, **kwargs)
            for names in _OPEN:
                names.append(self.__name__)
            return out

        return run


@contextlib.contextmanager
def record_launches() -> Iterator[list[str]]:
    """The names of the tracked kernels launched inside the block, in launch order."""
    names: list[str] = []
    _OPEN.append(names)
    try:
        yield names
    finally:
        _OPEN.remove(names)
