"""Packaging facts: the core imports no framework; the torch bindings install as a subpackage."""

import subprocess
import sys

import tensoradapt


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, tensoradapt, tensoradapt.ops, tensoradapt.buffers\n"
        "bad = [m for m in ('torch', 'cupy', 'tensorly', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_and_public_names() -> None:
    assert isinstance(tensoradapt.__version__, str) and tensoradapt.__version__
    assert tensoradapt.fold_side(10, 2) == 4
    for name in tensoradapt.ops.__all__:
        assert getattr(tensoradapt.ops, name) is not None


def test_torch_bindings_are_a_subpackage_and_do_not_shadow_torch() -> None:
    import torch

    import tensoradapt.torch as bindings

    assert bindings.__name__ == "tensoradapt.torch"
    assert bindings.TORCH_VERSION == torch.__version__
    assert hasattr(torch, "nn")  # the real torch, not the bindings folder
