"""verify streams (issue 12, section 4): masked and sliced runs in lockstep, the masked
model sharing the analysed weights. Same reports as the recorded reference path, wrong
slices still named, float64 copies of weights live one op at a time."""
import copy

import pytest
import torch
import transformers

import fxprune
import fxprune.api as api
from fxprune.core.errors import VerificationError
from passes.mask import insert_masks_shared


class Stack(torch.nn.Module):
    """Linear layers with a residual space: export hoists every weight's get_attr."""

    def __init__(self, depth=6, width=16):
        super().__init__()
        self.inp = torch.nn.Linear(5, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return self.out(h)


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3))


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 8)), \
        dict(frontend="export", split_policy="heads")


def _vit():
    """torchvision's encoder blocks: MultiheadAttention(need_weights=False) returns
    ``(out, None)``, so tracked ``getitem`` nodes hold None (ViT-L/16 lost the lockstep
    there: the masked run stepped past a None it never stored)."""
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=3,
                                                 num_heads=2, hidden_dim=16, mlp_dim=24,
                                                 num_classes=5)
    return model.eval(), torch.randn(1, 3, 16, 16), {}


CASES = {
    "vit-fx": _vit,
    "stack-export": lambda: (Stack().eval(), torch.randn(2, 4, 5), dict(frontend="export")),
    "convbn-fx": lambda: (ConvBN().eval(), torch.randn(2, 3, 6, 6), {}),
    "llama-export": _llama,  # inexact groups (RMSNorm): the exact-only recompile path
}


def _setup(case, seed=0):
    torch.manual_seed(seed)
    model, x, options = CASES[case]()
    analysis = fxprune.analyze(model, (x,), **options)
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random")
    return model, x, analysis, plan, fxprune.compile(analysis, plan)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_report_equals_recorded(case):
    model, x, analysis, plan, small = _setup(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    streamed = fxprune.verify(analysis, small, plan, (x,))
    recorded = api._verify_recorded(analysis, small, plan, (x,))
    assert streamed.ok and streamed.nodes_checked > 0
    assert streamed == recorded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["convbn-fx", "stack-export"])  # all groups exact
def test_tampered_weight_is_caught_and_named(case):
    model, x, analysis, plan, small = _setup(case)
    name, weight = [(n, p) for n, p in small.named_parameters() if p.dim() >= 2][1]
    with torch.no_grad():
        weight.view(-1)[0].add_(0.5)
    report = fxprune.verify(analysis, small, plan, (x,), raise_on_failure=False)
    assert not report.ok and report.worst_node, name
    assert report == api._verify_recorded(analysis, small, plan, (x,), raise_on_failure=False)
    with pytest.raises(VerificationError, match=repr(report.worst_node)):
        fxprune.verify(analysis, small, plan, (x,))


def test_masked_reference_shares_weights_and_zeroes_copies():
    model, x, analysis, plan, small = _setup("stack-export")
    masked, zeroed = insert_masks_shared(analysis, plan.kept_labels(analysis))
    ours = {id(t) for t in analysis.gm.parameters()}
    assert ours and all(id(t) in ours for t in masked.parameters())
    assert zeroed, "random 0.5 plan removes weight slices"
    # a float64 user model: its weights need no conversion, the removed slices still a copy
    model64, x64 = copy.deepcopy(model).double(), x.double()
    analysis64 = fxprune.analyze(model64, (x64,), frontend="export")
    before = {k: v.clone() for k, v in model64.state_dict().items()}
    plan64 = fxprune.Plan.from_ratio(analysis64, 0.5, criterion="random")
    small64 = fxprune.compile(analysis64, plan64)
    assert fxprune.verify(analysis64, small64, plan64, (x64,)).ok
    assert all(torch.equal(before[k], v) for k, v in model64.state_dict().items())


def test_float64_weight_copies_live_one_op_at_a_time(monkeypatch):
    """Export puts all get_attr nodes first; converting there would hold every weight."""
    import weakref

    model, x, analysis, plan, small = _setup("stack-export")
    live, peak = [], [0]
    convert = api._as_float64

    def tracked(t):
        d = convert(t)
        live.append(weakref.ref(d))
        live[:] = [r for r in live if r() is not None]
        peak[0] = max(peak[0], len(live))
        return d

    monkeypatch.setattr(api, "_as_float64", tracked)
    assert fxprune.verify(analysis, small, plan, (x,)).ok
    weights = sum(1 for _ in small.parameters())
    assert weights >= 16 and peak[0] <= 4, (peak[0], weights)


class ConvBNBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _convbnbn(**compile_options):
    torch.manual_seed(0)
    model, x = _randomise_bn(ConvBNBN()), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    return model, x, plan, fxprune.compile(model, plan, **compile_options)


def test_verify_accepts_a_fold_bn_result():
    """trial19: the folded convs were compared by node name with the unfolded masked
    convs (relative err 1.57) and the mismatch called an fxprune bug. Now: slice == mask
    on the unfolded slice, the fold proven by check_fold."""
    model, x, plan, folded = _convbnbn(fold_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    report = fxprune.verify(model, folded, plan, (x,))
    assert report.ok and report.nodes_checked > 0 and report.fold_error is not None
    plain = fxprune.verify(model, fxprune.compile(model, plan), plan, (x,))
    assert plain.fold_error is None


def test_a_wrong_fold_fails_verify():
    model, x, plan, folded = _convbnbn(fold_bn=True)
    with torch.no_grad():
        folded.c1.bias[0] += 0.5
    folded.meta["fxprune"].pop("state_digest")  # not "changed since compile": a bad fold
    report = fxprune.verify(model, folded, plan, (x,), raise_on_failure=False)
    assert not report.ok and report.fold_error == float("inf")
    with pytest.raises(VerificationError, match="fold .* not proven: fold_bn: 'c1.bias'"):
        fxprune.verify(model, folded, plan, (x,))


@pytest.mark.parametrize("output", ["graph", "module"])
def test_a_model_trained_after_compile_is_named_not_called_a_bug(output):
    """trial19: ``small.train()`` + one forward updates BatchNorm's running statistics;
    verify then failed with "This is an fxprune bug"."""
    model, x, plan, small = _convbnbn(output=output)
    small.train()
    with torch.no_grad():
        small(torch.randn(2, 3, 8, 8))
    small.eval()
    report = fxprune.verify(model, small, plan, (x,), raise_on_failure=False)
    assert not report.ok and "b1.running_mean" in report.changed
    with pytest.raises(VerificationError, match="changed after fxprune.compile") as e:
        fxprune.verify(model, small, plan, (x,))
    assert "fxprune bug" not in str(e.value) and "compile the plan again" in str(e.value)


class _BatchTimesChannels(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        n, c, h, w = y.shape
        z = y.reshape(n * c, -1)
        return self.c2((z - z.mean(1, keepdim=True)).reshape(n, c, h, w))


def test_verify_checks_a_second_batch_size():
    """A size right at the example batch only (the literal n * c of batch 1 that
    fix_sizes once wrote) passes slice == mask at the example batch; verify's run at one
    more sample catches it."""
    torch.manual_seed(0)
    model, x = _BatchTimesChannels().eval(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    small = fxprune.compile(model, plan)
    assert fxprune.verify(model, small, plan, (x,)).other_batch == "ok at batch 2"
    (node,) = [n for n in small.graph.nodes if n.name == "reshape"]
    node.args = (node.args[0], 8, -1)  # the batch-1 literal
    small.recompile()
    report = fxprune.verify(model, small, plan, (x,), raise_on_failure=False)
    assert not report.ok and report.other_batch.startswith("failed at batch 2")
    with pytest.raises(VerificationError, match="example batch only"):
        fxprune.verify(model, small, plan, (x,))
