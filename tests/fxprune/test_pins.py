"""Issue 8 item 1: every pinned parameter dim is visible, with reason, node and source."""
import textwrap

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.cli import main


class FftTail(nn.Module):
    """``b``'s outputs reach an op without a rule (fft): pinned; ``a``'s stay prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        return torch.fft.fft(y).real + self.c(y)


class Opaque(nn.Module):
    """A module fx keeps whole and no rule knows: its conv is pinned by the call_module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv(x)


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.o, self.b = nn.Conv2d(3, 8, 1), Opaque(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.o(self.a(x)))


def _pins(model, **kw):
    an = fxprune.analyze(model, (torch.randn(1, 3, 4, 4),), **kw)
    return an, {(p.fqn, p.dim): p for p in an.pins()}


def test_pins_name_reason_node_and_source_line():
    an, pins = _pins(FftTail())
    p = pins[("b.weight", 0)]
    assert p.whole and p.pinned == 4
    assert "no rule" in p.reason and "fft" in p.reason
    assert p.node == "fft_fft"
    assert "test_pins.py" in p.source and "torch.fft.fft(y)" in p.source
    assert pins[("c.weight", 0)].node == "add"  # meets the untracked fft branch
    assert ("a.weight", 0) not in pins  # group 0 is prunable: no pin
    assert [g.name for g in an.groups] == ["a.weight[0]"]
    table = an.pins_table()
    assert "b.weight[0]" in table and "fft_fft" in table


def test_a_module_call_names_the_users_line_not_the_tracer():
    an, pins = _pins(FftTail())
    p = pins[("a.weight", 1)]  # the model's input: pinned at the call of self.a
    assert "test_pins.py" in p.source and "self.b(self.a(x))" in p.source, p.source
    with pytest.raises(fxprune.ShapePropagationError, match=r"test_pins\.py.*in module 'a'"):
        fxprune.analyze(FftTail(), (torch.randn(1, 5, 4, 4),))


def test_pins_list_weights_no_rule_ever_read():
    # a leaf module without a rule: its parameters never reach the unit store
    an, pins = _pins(WithOpaque(), leaf_modules=(Opaque,))
    p = pins[("o.conv.weight", 0)]
    assert p.whole and p.node == "o" and "no rule" in p.reason and "Opaque" in p.reason
    assert "a.weight" in {k[0] for k in pins}  # its outputs meet the barrier too


def test_no_pins_when_everything_prunes():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    an, pins = _pins(m)
    # only the model's own boundary: the first conv's input columns, the last conv's rows
    assert set(pins) == {("0.weight", 1), ("2.weight", 0), ("2.bias", 0)}
    assert "model output" in pins[("2.weight", 0)].reason


@pytest.fixture
def models_module(tmp_path, monkeypatch):
    (tmp_path / "_pins_models.py").write_text(textwrap.dedent("""
        import torch
        from test_pins import FftTail
        def fft_tail():
            return FftTail(), (torch.randn(1, 3, 4, 4),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))


def test_cli_inspect_pins(models_module, capsys):
    assert main(["inspect", "_pins_models:fft_tail", "--pins"]) == 0
    out = capsys.readouterr().out
    assert "parameter dims left whole" in out and "see fxprune inspect --pins" in out
    assert "b.weight[0]" in out and "no rule for call_function fft_fft" in out
    assert "torch.fft.fft(y)" in out


def test_cli_prune_summarises_pins(models_module, capsys):
    assert main(["prune", "_pins_models:fft_tail", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    pins = fxprune.analyze(FftTail(), (torch.randn(1, 3, 4, 4),)).pins()
    whole = sum(p.whole for p in pins)
    assert f"{whole} parameter dims left whole" in out and "inspect --pins" in out
