"""The two per-layer ops, run by the C++ extension when it is built and loaded,
and by the pure-torch twins in :mod:`lowrank_merge.engines` otherwise.

Ops (namespace ``lowrank_merge``, registered with ``TORCH_LIBRARY``):

* ``low_rank_factors(Tensor A, int k, str engine, int niter, Tensor? omega)
  -> (Tensor U, Tensor S, Tensor Vh)``
* ``centered_low_rank_sum(Tensor stack, int k, str engine, int niter,
  Tensor? omega) -> (Tensor average, Tensor delta)``

Fake (meta) kernels are registered here so that ``torch.compile`` and
``torch.library.opcheck`` can trace them.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import engines

NAMESPACE = "lowrank_merge"
_load_error: str | None = None
_warned = False

try:
    importlib.import_module(f"{__package__}._C")  # importing registers the ops
except Exception as error:  # not built, or an undefined symbol from an ABI mismatch
    _load_error = f"{type(error).__name__}: {error}"


def extension_available() -> bool:
    """Whether the compiled ``lowrank_merge._C`` extension is loaded.

    When it is not, every function still works through pure torch; a warning
    says once why the extension is unavailable.
    """
    global _warned
    if _load_error is not None and not _warned:
        _warned = True
        warnings.warn(
            f"lowrank_merge C++ extension not available ({_load_error}); using the pure-torch path",
            RuntimeWarning,
            stacklevel=2,
        )
    return _load_error is None


def has_kernel(device_type: str) -> bool:
    """Whether the extension has a kernel for tensors on ``device_type``."""
    if not extension_available():
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::centered_low_rank_sum", dispatch_key
    )


if _load_error is None:

    # The fake kernels (meta tensors, torch.compile) check what the real ones
    # check: a meta omega beside a CPU A would otherwise select them and return
    # uninitialised CPU tensors.
    @torch.library.register_fake(f"{NAMESPACE}::low_rank_factors")
    def _low_rank_factors_fake(A: Tensor, k: int, engine: str, niter: int, omega: Tensor | None):
        engines.check_op_arguments(A, k, engine, niter, omega)
        return engines.empty_factors(A, k)

    @torch.library.register_fake(f"{NAMESPACE}::centered_low_rank_sum")
    def _centered_low_rank_sum_fake(stack: Tensor, k: int, engine: str, niter: int, omega: Tensor | None):
        engines.check_op_arguments(stack, k, engine, niter, omega, stack=True)
        _, m, n = stack.shape
        return stack.new_empty(m, n), stack.new_empty(m, n)


def set_cpu_matmul_backend(name: str) -> None:
    """Choose the library that runs the engines' float32 matrix products on the CPU.

    ``"blas"``: torch's matmul (MKL in the x86 wheels); ``"onednn"``: torch's
    oneDNN inner product, 18-45 % faster on an AMD EPYC (Zen 4) where MKL does not
    pick its best kernels (benchmarks/NOTES.md); ``"auto"``: oneDNN on AMD CPUs,
    the BLAS elsewhere. The default is ``$LOWRANK_MERGE_CPU_MATMUL``, else
    ``"auto"``. Both compute in float32; results differ only by rounding.
    Applies to the C++ ops and the pure-torch path alike.

    Raises:
        ValueError: for an unknown name, or ``"onednn"`` where torch has no oneDNN.
    """
    engines._set_cpu_matmul_backend(name)
    if _load_error is None:
        torch.ops.lowrank_merge._set_cpu_matmul_backend(engines.cpu_matmul_backend())


set_cpu_matmul_backend(engines.default_cpu_matmul_backend())


def low_rank_factors(
    A: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    if has_kernel(A.device.type):
        return torch.ops.lowrank_merge.low_rank_factors(A, k, engine, niter, omega)
    return engines.low_rank_factors(A, k, engine, niter, omega)


def centered_low_rank_sum(
    stack: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor]:
    if has_kernel(stack.device.type):
        return torch.ops.lowrank_merge.centered_low_rank_sum(stack, k, engine, niter, omega)
    return engines.centered_low_rank_sum(stack, k, engine, niter, omega)


@contextmanager
def huge_page_allocations(device: torch.device) -> Iterator[None]:
    """Within: CPU allocations of at least 2 MiB are backed by transparent huge
    pages (``csrc/huge_pages.h``: a fresh buffer's first touch then faults per
    2 MiB instead of per 4 KiB, about 2 s of 17 s on a [8, 4096, 14336] layer),
    and a buffer freed within is reused by the next allocation of its size, so
    a scope around a whole merge faults fresh pages in only for the first layer
    of each shape (holding at most twice its largest buffer more than the
    scope's peak of live buffers).
    Scopes nest. A no-op off the CPU and without the extension."""
    if device.type != "cpu" or not has_kernel("cpu"):
        yield
        return
    torch.ops.lowrank_merge._begin_huge_pages()
    try:
        yield
    finally:
        torch.ops.lowrank_merge._end_huge_pages()
