"""Exported attention keeps train-mode semantics: SDPA's dropout_p follows train()/eval()."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.distill import Pruner, set_graph_training


class Attn(nn.Module):
    """One attention layer whose dropout_p depends on the mode, as Hugging Face BERT's."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out, self.heads = nn.Linear(d, d), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        p = 0.5 if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=0.25)  # as HF passes it
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def _sdpa_p(gm):
    return [n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
            for n in gm.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]


def test_exported_student_attention_dropout_follows_mode():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    pruner = Pruner(Attn(), (x,), frontend="export", target_params=0.8, interval=1, steps=1)
    gm = pruner.student.gm
    assert _sdpa_p(gm) == [0.5]  # captured in train mode
    pruner.student.eval()
    assert _sdpa_p(gm) == [0.0]
    with torch.no_grad():
        assert torch.equal(pruner.student(x), pruner.student(x))  # deterministic in eval
    pruner.student.train()
    assert _sdpa_p(gm) == [0.5]
    with torch.no_grad():
        assert not torch.equal(pruner.student(x), pruner.student(x))  # dropout active
    assert set_graph_training(gm, True) == 0  # already in train mode: nothing changes
    pruner.step()
    result = pruner.finish()  # slice == mask holds (eval: no attention dropout)
    assert result.report.ok and _sdpa_p(result.model) == [0.0]
