"""The Fastfood projection on its own: a fixed random map R^n → R^N in O(L log L).

``F = c · Trunc_N · H · diag(g) · Π · H · diag(b) · Pad_L`` (Li et al. 2018; docs/math.md D5) with
``L`` the next power of two, unnormalised Hadamard ``H``, random signs ``b``, a permutation ``Π``
and Gaussian ``g``, all derived from the seed.  This script shows that it is linear, that its
adjoint is exact, that it roughly preserves norms, that it equals the dense matrix it stands for,
and that it is differentiable in torch.

    python examples/fastfood.py
"""

from __future__ import annotations

import time

import numpy as np

from tensoradapt import ops


def main() -> None:
    rng = np.random.default_rng(0)
    n, N = 1_000, 30_000
    F = ops.Fastfood(n, N, seed=0)
    z, y = rng.standard_normal(n), rng.standard_normal(N)
    print(f"Fastfood R^{n} -> R^{N} (L = {F.length:,}, scale c = {F.scale:.3g})")
    print(f"  adjoint identity  <Fz, y> = {np.dot(F.apply(z), y):+.6f}   <z, F^T y> = {np.dot(z, F.adjoint(y)):+.6f}")
    ratios = [np.linalg.norm(F.apply(v)) ** 2 / np.linalg.norm(v) ** 2 for v in rng.standard_normal((50, n))]
    print(f"  ‖Fz‖²/‖z‖² over 50 random z: mean {np.mean(ratios):.3f}, std {np.std(ratios):.3f}")

    small = ops.Fastfood(40, 300, seed=1)
    dense = np.stack([small.apply(e) for e in np.eye(40)], axis=1)  # column j = F e_j
    v = rng.standard_normal(40)
    print(f"  equals its dense (300 x 40) matrix: max |F v - M v| = {np.abs(small.apply(v) - dense @ v).max():.1e}")

    big = ops.Fastfood(100_000, 4_000_000, seed=2)
    x = rng.standard_normal(100_000).astype(np.float32)
    big.apply(x)  # builds the buffers once
    start = time.perf_counter()
    big.apply(x)
    print(f"  R^100,000 -> R^4,000,000 in {1e3 * (time.perf_counter() - start):.0f} ms "
          f"(a dense float32 matrix would need {100_000 * 4_000_000 * 4 / 2**30:,.0f} GiB)")

    try:
        import torch

        from tensoradapt.torch import functional as taf
    except ImportError:
        return
    zt = torch.randn(n, dtype=torch.float64, requires_grad=True)
    loss = taf.fastfood(zt, F).square().sum()
    loss.backward()
    expected = 2 * torch.from_numpy(F.adjoint(F.apply(zt.detach().numpy())))
    print(f"  torch autograd: d‖Fz‖²/dz = 2 F^T F z, max error {(zt.grad - expected).abs().max():.1e}")


if __name__ == "__main__":
    main()
