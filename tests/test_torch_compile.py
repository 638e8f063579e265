"""torch.compile: every preset (projections included) compiles on the first call, matches eager,
and each SuperLoRA component is one opaque operator (no graph break inside the core's Python)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import SuperLoRA, buffers, presets  # noqa: E402
from tensoradapt.torch.functional import superlora_component_delta  # noqa: E402

SHAPES = [(64, 48), (64, 48), (32, 64)]
_BASE = presets.lorta(3, 2, 1)
CONFIGS = {
    "lora": presets.lora(4),
    "lorta": _BASE,
    "lonkr": presets.lonkr(2, 2, 4, 1),
    "loha": presets.loha(2),
    "lokr": presets.lokr(2),
    "krona": presets.krona(),
    "lotr": presets.lotr(2),
    "dense": presets.dense(),
    "shuffle": presets.with_projection(_BASE, "shuffle"),
    "fastfood-v1": presets.with_projection(_BASE, "fastfood", 0.1),
    "fastfood-v2": presets.with_projection(_BASE, "fastfood", 0.1),
}
GENERATORS = {"fastfood-v1": buffers.GENERATOR_V1, "fastfood-v2": buffers.GENERATOR_V2}


def _problem(name: str) -> tuple[SuperLoRA, dict[str, torch.Tensor], list[tuple[tuple[int, ...], tuple[str, ...]]],
                                 list[torch.Tensor]]:
    shapes = SHAPES[:2] if name == "lotr" else SHAPES
    plan = SuperLoRA(CONFIGS[name], shapes, generator=GENERATORS.get(name))
    init = {k: torch.from_numpy(v).double() for k, v in plan.init(0, zero=False).items()}
    components = [(tuple(t), tuple(sorted(plan.parameter_shapes(g)))) for t, g in plan.components()]
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return plan, init, components, weights


def _loss_fn(plan: SuperLoRA, components: list, weights: list[torch.Tensor]):
    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for targets, names in components:
            deltas = superlora_component_delta(plan, targets, {n: params[n] for n in names})
            for i, d in zip(targets, deltas, strict=True):
                total = total + (d * weights[i]).sum()
        return total

    return loss


def _run(fn, init: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    out = fn(params)
    out.backward()
    return out.detach(), {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_functional_component_is_one_operator(name: str) -> None:
    plan, init, components, weights = _problem(name)
    loss = _loss_fn(plan, components, weights)
    ref, ref_grads = _run(loss, init)  # the eager call registers the components
    explanation = torch._dynamo.explain(loss)({k: v.clone() for k, v in init.items()})
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    torch._dynamo.reset()
    out, grads = _run(torch.compile(loss, backend="aot_eager", fullgraph=True), init)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["lorta", "fastfood-v2"])
def test_functional_inductor_matches_eager(name: str) -> None:
    plan, init, components, weights = _problem(name)
    loss = _loss_fn(plan, components, weights)
    ref, ref_grads = _run(loss, init)
    torch._dynamo.reset()
    out, grads = _run(torch.compile(loss, backend="inductor", fullgraph=True), init)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-9, atol=1e-10)


def test_component_first_met_inside_a_trace_still_works() -> None:
    """Without an eager call first the component is not registered: compile falls back to the
    autograd Function (graph breaks) and still matches eager."""
    plan, init, components, weights = _problem("lorta")
    loss = _loss_fn(plan, components, weights)
    torch._dynamo.reset()
    out, grads = _run(torch.compile(loss, backend="aot_eager"), init)
    ref, ref_grads = _run(loss, init)
    torch.testing.assert_close(out, ref)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k])


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.v = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.q(x)) + self.v(x)


@pytest.mark.parametrize("name", ["lora", "lorta", "loha", "shuffle", "fastfood-v2"])
def test_adapted_model_compiles_without_graph_breaks(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block()).double()
    adapter = tat.attach(model, CONFIGS[name], ["q", "v"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(4, 32, dtype=torch.float64)
    # before any eager call: attach registered every component as an operator
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    torch._dynamo.reset()
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in adapter.trainable_parameters()]
    adapter.zero_grad()
    out = torch.compile(model, backend="aot_eager")(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for p, g in zip(adapter.trainable_parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_adapted_model_compiles_to_its_own_values(how: str) -> None:
    """Copies and pickles carry no operator keys of the original (they would run the original's
    plan, or none once it is gone): the copy registers its own components."""
    import copy
    import gc
    import io

    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block()).double()
    adapter = tat.attach(model, CONFIGS["fastfood-v2"], ["q", "v"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    del model, adapter
    gc.collect()
    other = nn.Sequential(_Block(), _Block()).double()  # same shapes, other values: must not be mixed up
    tat.attach(other, CONFIGS["fastfood-v2"], ["q", "v"], seed=123)
    with torch.no_grad():
        for p in clone.tensoradapt["default"].trainable_parameters():
            p.mul_(1.5)
    x = torch.randn(4, 32, dtype=torch.float64)
    explanation = torch._dynamo.explain(clone)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    torch._dynamo.reset()
    ref = clone(x)
    torch.testing.assert_close(torch.compile(clone, backend="aot_eager")(x), ref, rtol=1e-10, atol=1e-12)
