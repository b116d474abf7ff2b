"""Issue 8 item 4: torch.nn's composite layers are traced through (the default front-end
finds what export finds), and MultiheadAttention with kdim/vdim prunes."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune

X = torch.randn(2, 5, 4)


class Enc(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc, self.layer, self.out = nn.Linear(4, 8), layer, nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.layer(self.fc(x)))


class Dec(Enc):
    def forward(self, x):
        h = self.fc(x)
        return self.out(self.layer(h, h))


def _enc_layer(**kw):
    return nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0, **kw)


CASES = {
    "encoder_layer": lambda: Enc(_enc_layer()),
    "encoder_layer_norm_first": lambda: Enc(_enc_layer(norm_first=True)),
    "encoder_layer_gelu": lambda: Enc(_enc_layer(activation="gelu")),
    "decoder_layer": lambda: Dec(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True,
                                                            dropout=0.0)),
    "encoder": lambda: Enc(nn.TransformerEncoder(_enc_layer(), 2, enable_nested_tensor=False)),
    "transformer": lambda: Dec(nn.Transformer(8, 2, 1, 1, 16, batch_first=True, dropout=0.0)),
}


def _signature(an):
    # granularity is counted on the group's first slice: a packed MHA in_proj row block
    # (fx) and a q_proj row block (export) differ there, the units do not
    return sorted((g.size, g.exact) for g in an.groups)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("encoder", "transformer") else n
                                  for n in sorted(CASES)])
def test_default_front_end_finds_what_export_finds(name):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.Transformer/Encoder: the export fallback
        auto = fxprune.analyze(model, (X,))
        export = fxprune.analyze(model, (X,), frontend="export")
    assert len(auto.groups) >= 3
    assert _signature(auto) == _signature(export)
    if name.endswith("layer") or "layer_" in name:
        assert auto.gm.meta["fxprune"]["frontend"] == "fx"  # traced inside, no fallback
    plan = fxprune.Plan.from_ratio(auto, 0.5, criterion="random")
    small = fxprune.compile(auto, plan)
    report = fxprune.verify(auto, small, plan, (X,))
    assert report.ok and report.params_after < report.params_before


def test_fast_path_setting_is_restored():
    before = torch.backends.mha.get_fastpath_enabled()
    fxprune.analyze(CASES["encoder_layer"]().eval(), (X,))
    assert torch.backends.mha.get_fastpath_enabled() == before


class KV(nn.Module):
    def __init__(self, kdim, vdim) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 8), nn.Linear(4, kdim or 8), nn.Linear(4, vdim or 8)
        self.mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.mha(self.q(x), self.k(x), self.v(x))[0])


@pytest.mark.parametrize("kdim,vdim", [(6, 5), (6, None), (None, 5), (6, 6)])
@pytest.mark.parametrize("policy", ["head_dim", "heads"])
def test_mha_kdim_vdim_prunes(kdim, vdim, policy):
    torch.manual_seed(0)
    model = KV(kdim, vdim).eval()
    an = fxprune.analyze(model, (X,), split_policy=policy)
    names = [g.name for g in an.groups]
    assert {"q.weight[0]", "k.weight[0]", "v.weight[0]", "mha.out_proj.weight[0]"} <= set(names)
    heads = an.group("mha.q_proj_weight[0]")
    assert heads.size == (4 if policy == "head_dim" else 2)
    assert {"mha.k_proj_weight", "mha.v_proj_weight", "mha.out_proj.weight"} <= \
        {m.fqn for m in heads.members}
    plan = fxprune.Plan.from_ratio(an, 0.5, criterion="random")
    small = fxprune.compile(model, plan)
    assert fxprune.verify(model, small, plan, (X,)).ok
