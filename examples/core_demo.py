"""Core demo: fit a cross-layer weight update with a Tucker generator and a Fastfood projection.

Everything here runs on the framework-free core (NumPy by default; pass ``--backend torch`` to
run the very same code on torch tensors).  The pipeline is the SuperLoRA map of docs/math.md §2 written
out by hand from the core operators:

    θ = (C, A_1, A_2, A_3) → X = Tucker(C, A) → z = Cut_n(X) → y = Fastfood(z) → ΔW_i = split(y)

and its gradient is the composition of the operators' analytic VJPs.  The demo fits the update to
a synthetic target with Adam and prints the loss, the parameter count and an adjoint check.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import tensoradapt as ta
from tensoradapt import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.25, help="projection ratio rho = n / N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.backend == "torch":
        import torch

        def asarray(a: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(a))
    else:
        asarray = np.asarray

    shapes = [(64, 64)] * 4  # four targeted weights, one group (G = 1)
    grouping = ops.Grouping(shapes, grouping=1)
    big = grouping.total
    n = max(1, math.ceil(args.ratio * big))
    order = 3
    side = ta.fold_side(n, order)
    projection = ops.Fastfood(n, big, seed=args.seed)
    print(f"targets {shapes} -> N = {big:,} entries; generator fold {side}^{order} = {side**order:,}"
          f" cut to n = {n:,} (rho = {n / big:.3f}); Fastfood L = {projection.length:,}")

    rng = np.random.default_rng(args.seed)
    rank = args.rank

    def random_params(scale_core: float) -> list:
        core = scale_core * rng.standard_normal((rank,) * order)
        factors = [rng.standard_normal((side, rank)) / math.sqrt(side) for _ in range(order)]
        return [asarray(p) for p in (core, *factors)]

    def forward(theta: list) -> list:
        tensor = ops.tucker_to_tensor(theta[0], theta[1:])
        return grouping.to_targets([projection.apply(ops.cut(tensor, n))])

    def loss_and_grad(theta: list, target: list) -> tuple[float, list]:
        residual = [d - t for d, t in zip(forward(theta), target, strict=True)]
        loss = 0.5 * sum(float((r * r).sum()) for r in residual)
        (group_cot,) = grouping.from_targets(residual)          # adjoint of the split
        z_cot = projection.adjoint(group_cot)                   # Fastfood^T
        x_cot = ops.pad(z_cot, (side,) * order)                 # Cut^T
        core_grad, factor_grads = ops.tucker_vjp(theta[0], theta[1:], x_cot)
        return loss, [core_grad, *factor_grads]

    # A teacher of the same family gives a reachable target; the student starts at ΔW = 0.
    target = forward(random_params(1.0))
    params = random_params(0.0)
    count = sum(int(np.prod(p.shape)) for p in params)
    print(f"trainable parameters: {count:,} (a dense update has {big:,}: {big / count:.0f}x more)")

    # Whole-pipeline adjoint check: directional derivative by central differences vs the VJP.
    probe = random_params(0.5)
    direction = random_params(1.0)
    _, grads = loss_and_grad(probe, target)
    eps = 1e-6
    plus = [p + eps * d for p, d in zip(probe, direction, strict=True)]
    minus = [p - eps * d for p, d in zip(probe, direction, strict=True)]
    numeric = (loss_and_grad(plus, target)[0] - loss_and_grad(minus, target)[0]) / (2 * eps)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    print(f"VJP check: finite differences {numeric:.6f} vs analytic {analytic:.6f}")

    m = [0.0 * p for p in params]
    v = [0.0 * p for p in params]
    lr, beta1, beta2, tiny = 0.05, 0.9, 0.999, 1e-8
    initial = loss_and_grad(params, target)[0]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, grads = loss_and_grad(params, target)
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat, v_hat = m[i] / (1 - beta1**step), v[i] / (1 - beta2**step)
            params[i] = params[i] - lr * m_hat / (v_hat**0.5 + tiny)
        if step in (1, 10, 50) or step % 100 == 0:
            print(f"step {step:4d}  loss {loss:.6f}")
    elapsed = time.perf_counter() - start
    final = loss_and_grad(params, target)[0]
    print(f"loss {initial:.4f} -> {final:.6f} ({final / initial:.2%} of the start) in {args.steps} "
          f"Adam steps, {elapsed / args.steps * 1e3:.1f} ms per step on {args.backend}")


if __name__ == "__main__":
    main()
