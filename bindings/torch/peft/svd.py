r"""The rank-``r`` export of any SuperLoRA adapter: each target's truncated SVD as a LoRA.

Target ``i`` gets the best rank-``r`` approximation ``ΔW_r = U_r Σ_r V_rᵀ`` of ``ΔW_i`` (float64 on
the adapter's device, one plan component at a time; Eckart–Young: ``‖ΔW − ΔW_r‖_F² = Σ_{k>r}
σ_k²``), written as ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ`` with scaling ``α/r = 1``; the
relative error ``‖ΔW − B A‖_F / ‖ΔW‖_F`` of what is written is reported per target.
``rank="exact"`` takes per target the smallest rank within :data:`EXACT_TOLERANCE`.  The kohya
export (:mod:`tensoradapt.torch.lycoris`) uses the same SVDs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .. import progress
from . import lora
from .layout import check_layer
from .source import Source, Target

#: The relative Frobenius error ``rank="exact"`` allows per target.
EXACT_TOLERANCE = 1e-6
#: Most targets an SVD export handles without a progress bar (more draw one when stderr is a terminal).
PROGRESS_MIN_TARGETS = 8
#: Largest ``min(o, n)`` whose CPU SVDs run on one thread.  A small SVD gains little from a second
#: thread on a quiet machine (256x256: 11 ms on two threads, 16 ms on one) and loses a lot when the
#: cores are shared: every step of MKL's SVD waits for the slowest thread, and with another process
#: on the cores a 4-layer, 256-wide Llama's 28 SVDs took 4-7 s on two threads against 0.5 s on one.
ONE_THREAD_SVD_SIDE = 512


def _progress(total: int) -> Any:
    """The export's progress bar over ``total`` targets (``None`` when there are few of them, or
    when stderr is not a terminal): the one bar of the torch command lines and the demo."""
    if total < PROGRESS_MIN_TARGETS:
        return None
    return progress.progress_bar(total, "export-peft", True, unit="target")


@contextlib.contextmanager
def svd_threads(source: Source) -> Iterator[None]:
    """One torch thread inside the block when every target is small and the work is on the CPU
    (see :data:`ONE_THREAD_SVD_SIDE`); the previous thread count is restored after."""
    device = next(iter(source.params.values())).device if source.params else torch.device("cpu")
    small = all(min(t.shape) <= ONE_THREAD_SVD_SIDE for t in source.targets)
    previous = torch.get_num_threads()
    if device.type != "cpu" or not small or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def factor_dtype(source: Source) -> torch.dtype:
    """The dtype SVD factors are written in: the adapter's, float32 for a half-precision one (PEFT
    and LyCORIS load them into their layers' dtype)."""
    dtype = next(iter(source.params.values())).dtype if source.params else torch.float32
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def deltas(source: Source, wanted: Iterable[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(target, ΔW)`` in float64 from the parameters (a half-precision adapter's own forward
    rounds it), one plan component at a time, for the targets ``wanted`` (default: all)."""
    plan = source.plan
    assert plan is not None
    keep = None if wanted is None else set(wanted)
    for targets, groups in plan.components():
        if keep is not None and not keep.intersection(targets):
            continue
        params = {name: source.params[name].to(torch.float64) for name in plan.parameter_shapes(groups)}
        with torch.no_grad():
            found = plan.delta_for(params, targets)
        del params
        for t, delta in zip(targets, found, strict=True):
            if keep is None or t in keep:
                yield t, delta
        del found


def encode(source: Source, rank: int | str, progress: bool = True) -> tuple:
    """The PEFT LoRA of every target's truncated SVD (``rank`` an int or ``"exact"``)."""
    for target in source.targets:
        check_layer(target, "LoRA", "", lora=True)
        if isinstance(rank, int) and rank > min(target.shape):
            smallest = min(min(t.shape) for t in source.targets)
            raise ValueError(f"rank={rank} exceeds min(o, n) = {min(target.shape)} of target {target.name!r} "
                             f"(o, n) = {target.shape}; pass a rank <= {smallest} (the smallest min(o, n) "
                             "of all targets) or 'exact'")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    out_dtype = factor_dtype(source)
    bar = _progress(len(source.targets)) if progress else None
    try:
        with svd_threads(source):
            for t, delta in deltas(source):
                target = source.targets[t]
                B, A, q, error = truncated(target, delta, rank, out_dtype)
                ranks[target.name] = q
                errors[target.name] = error
                tensors.update(lora.tensors(target, B, A))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    alphas = {n: float(q) for n, q in ranks.items()}  # scaling α/r = 1 on every target
    return lora.PEFT_TYPE, lora.config(source, ranks, alphas), tensors, ranks, errors


def truncated(target: Target, delta: torch.Tensor, rank: int | str,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(B, A, r, relative error)`` of the rank-``r`` truncated SVD of ``ΔW`` (float64 on its device),
    ``B`` and ``A`` in ``dtype`` (the error is that of the factors in ``dtype``)."""
    work = delta.detach().to(torch.float64)
    if target.layer == "embedding" and target.padding_idx is not None:
        work = work.clone()
        work[target.padding_idx] = 0  # the row tensoradapt never updates
    total = float(torch.linalg.matrix_norm(work))
    if total == 0.0:  # an untrained LoRA-like ΔW = 0: rank 1 of zeros, exact
        q = 1 if rank == "exact" else int(rank)
        zero_b = torch.zeros(work.shape[0], q, dtype=dtype, device=work.device)
        return zero_b, torch.zeros(q, work.shape[1], dtype=dtype, device=work.device), q, 0.0
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)

    def factors(q: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        root = S[:q].sqrt()
        B = (U[:, :q] * root).to(dtype)
        A = (root[:, None] * Vh[:q]).to(dtype)
        error = float(torch.linalg.matrix_norm(work - B.to(torch.float64) @ A.to(torch.float64))) / total
        return B, A, error

    if rank != "exact":
        B, A, error = factors(int(rank))
        return B, A, int(rank), error
    return _smallest_exact(S, total, min(work.shape), factors)


def _smallest_exact(S: torch.Tensor, total: float, limit: int, factors: Any) -> tuple:
    """The smallest ``q`` whose written factors are within :data:`EXACT_TOLERANCE` (or the full rank).

    Starts at the truncation's rank (``‖σ_{q..}‖ <= tol · ‖ΔW‖``); the factors' rounding to their
    dtype can push the error of what is written above it, then ``q`` grows (doubling the step,
    then bisecting: ``O(log r)`` evaluations of the error, each ``O(o n q)``, not one per rank)."""
    # tail[k] = ‖σ_{k..}‖: the Eckart–Young error of rank k
    tail = torch.flip(torch.cumsum(torch.flip(S * S, [0]), 0), [0]).sqrt()
    tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype, device=tail.device)])
    q = max(1, int((tail[1:] <= EXACT_TOLERANCE * total).nonzero()[0, 0]) + 1) if limit else 1
    best = factors(q)
    if best[2] <= EXACT_TOLERANCE or q >= limit:
        return best[0], best[1], q, best[2]
    failing, step = q, 1  # the largest rank known to fail
    while True:
        q = min(limit, failing + step)
        best = factors(q)
        if best[2] <= EXACT_TOLERANCE:
            break
        if q >= limit:  # nothing within the tolerance: the full rank (its error is the rounding's)
            return best[0], best[1], q, best[2]
        failing, step = q, 2 * step
    while q - failing > 1:
        middle = (failing + q) // 2
        found = factors(middle)
        if found[2] <= EXACT_TOLERANCE:
            q, best = middle, found
        else:
            failing = middle
    return best[0], best[1], q, best[2]
