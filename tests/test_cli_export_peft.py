"""``tensoradapt export-peft``: an adapter file alone (no base model) to a PEFT folder; bad input
exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import presets  # noqa: E402
from tensoradapt.cli import main  # noqa: E402


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(24, 16)
        self.v = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.v(x)


def _saved(tmp_path: Path, config, *, folder: bool = False) -> tuple[Path, _Net, tat.BaseAdapter]:
    torch.manual_seed(0)
    model = _Net()
    adapter = tat.attach(model, config, ["q", "v"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / ("saved" if folder else "adapter.safetensors")
    adapter.save_pretrained(path) if folder else adapter.save(path)
    return path, model, adapter


def test_exact_lora_from_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, model, _ = _saved(tmp_path, presets.lora(4), folder=True)
    out = tmp_path / "peft"
    assert main(["export-peft", str(source), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PEFT LORA adapter" in printed and "q" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    peft = pytest.importorskip("peft")
    base = _Net()
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                          if not k.startswith("tensoradapt.")}, strict=True)
    x = torch.randn(5, 24)
    expected = model(x)
    served = peft.PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(served(x), expected, rtol=1e-5, atol=1e-6)


def test_rank_export_of_lorta_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, _, adapter = _saved(tmp_path, presets.lorta(3, 4, 1))
    out = tmp_path / "served"
    assert main(["export-peft", str(source), str(out), "--rank", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PEFT LORA adapter") and "largest relative error" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"q", "v"} and all(r[0] == "2" for r in rows.values())
    # the reported error is the truncated SVD's (Eckart-Young), computed here independently
    deltas = adapter.deltas()
    for name, (_, error) in rows.items():
        s = torch.linalg.svdvals(deltas[name].double())
        assert float(error) == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-3, abs=1e-9)
    assert main(["export-peft", str(source), str(tmp_path / "exact"), "--rank", "exact"]) == 0
    assert "largest relative error" in capsys.readouterr().out


def test_many_targets_leave_captured_stderr_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The progress bar of a long export is drawn on a terminal only: nothing in captured output."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(12, 12) for _ in range(10)))
    adapter = tat.attach(model, presets.lorta(3, 2, 1), [str(i) for i in range(10)])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(tmp_path / "a.safetensors")
    assert main(["export-peft", str(tmp_path / "a.safetensors"), str(tmp_path / "o"), "--rank", "exact"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "10 targets" in captured.out


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "{out}"], "no adapter file or folder"),
    (["{plain}", "{out}"], "not a safetensors file"),
    (["{lorta}", "{out}"], "rank"),  # not exactly expressible: asks for --rank
    (["{lorta}", "{out}", "--rank", "0"], "is not a rank"),
    (["{lorta}", "{out}", "--rank", "x" * 5000], "is not a rank"),
    (["{lorta}", "{out}", "--rank", "\u0663"], "is not a rank"),  # an Arabic-Indic 3: not an ASCII number
    (["{lorta}", "{out}", "--rank", "2", "--base-model", " "], "--base-model is empty"),
    (["{lorta}", "{out}", "--rank", "17"], "17"),  # more than min(o, n) = 16
    (["{lorta}", "{file_out}"], "not a folder"),
    (["{lorta}"], "required"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                         message: str) -> None:
    lorta, _, _ = _saved(tmp_path, presets.lorta(3, 4, 1))
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"not a safetensors file at all")
    file_out = tmp_path / "file_out"
    file_out.write_text("x")
    names = {"missing": tmp_path / "nope.safetensors", "plain": plain, "lorta": lorta, "out": tmp_path / "o",
             "file_out": file_out}
    code = main(["export-peft", *(a.format(**{k: str(v) for k, v in names.items()}) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert len(err) < 1200


def test_console_script_runs(tmp_path: Path) -> None:
    source, _, _ = _saved(tmp_path, presets.lora(2))
    done = subprocess.run([sys.executable, "-m", "tensoradapt.cli", "export-peft", str(source),
                           str(tmp_path / "peft")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_the_cli_progress_bar_is_the_one_the_export_reads():
    """``tensoradapt.torch.cli.progress_bar`` (importable as before) is the function itself, and the
    module documents where the export looks it up, which is where a replacement must go."""
    from tensoradapt.torch import cli, progress

    assert cli.progress_bar is progress.progress_bar
    assert ":func:`tensoradapt.torch.progress.progress_bar`" in cli.__doc__
    assert "replace it there" in cli.__doc__
