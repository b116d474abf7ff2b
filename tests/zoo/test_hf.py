"""Zoo: Hugging Face transformers (v5) through the torch.export front-end.

Every model is built from a small config with random weights (seeded), captured with
``fxprune.trace(model, inputs, frontend="export")`` (torch.fx symbolic tracing cannot
trace transformers v5), analysed with both head policies ("outer": whole heads, GQA
key/value groups with their query heads; "inner": head_dim, rotary pairs kept paired),
pruned at random in every group, compiled and checked by ``check_pruned``: slice == mask
in float64 on exact groups, activation by activation; shapes, parameter values and
counts on the rest; the user's model untouched. Heads, MLP width and (where the model's
outputs do not expose it) the hidden size are required to shrink.

``python tests/zoo/test_hf.py`` prints the coverage table of docs/transformers.md.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402

B, N, V = 2, 8, 64
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=32)


class LogitsOnly(torch.nn.Module):
    """Encoder-decoders also return the encoder's last hidden state, which pins the hidden
    size; a user who wants to prune it keeps only the logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids).logits


@dataclass
class Case:
    """A model, its inputs, and the parameter dims that pruning must shrink."""

    model: torch.nn.Module
    inputs: tuple
    heads: tuple[str, ...]       # query (or fused qkv) weights: dim 0 (Conv1D: dim 1)
    mlp: tuple[str, ...]         # MLP up-projections
    hidden: str | None           # the token embedding (dim 1), None when pinned
    qkv_dim: int = 0
    notes: dict = field(default_factory=dict)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (B, N), generator=torch.Generator().manual_seed(seed))


def _layers(pattern: str, n: int = 2) -> tuple[str, ...]:
    return tuple(pattern.format(i) for i in range(n))


def bert() -> Case:
    cfg = transformers.BertConfig(**SMALL, type_vocab_size=2)
    model = transformers.BertForMaskedLM(cfg)
    return Case(model, (_ids(), torch.ones(B, N, dtype=torch.long)),
                _layers("bert.encoder.layer.{}.attention.self.query.weight"),
                _layers("bert.encoder.layer.{}.intermediate.dense.weight"),
                "bert.embeddings.word_embeddings.weight")


def roberta() -> Case:
    cfg = transformers.RobertaConfig(**SMALL, type_vocab_size=1, pad_token_id=1)
    model = transformers.RobertaForMaskedLM(cfg)
    return Case(model, (_ids(), torch.ones(B, N, dtype=torch.long)),
                _layers("roberta.encoder.layer.{}.attention.self.query.weight"),
                _layers("roberta.encoder.layer.{}.intermediate.dense.weight"),
                "roberta.embeddings.word_embeddings.weight")


def gpt2() -> Case:
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  n_inner=48, use_cache=False, bos_token_id=0, eos_token_id=0)
    return Case(transformers.GPT2LMHeadModel(cfg), (_ids(),),
                _layers("transformer.h.{}.attn.c_attn.weight"),
                _layers("transformer.h.{}.mlp.c_fc.weight"), "transformer.wte.weight",
                qkv_dim=1)


def _decoder(config_cls, model_cls, **extra) -> Case:
    cfg = config_cls(**SMALL, num_key_value_heads=2, use_cache=False, **extra)
    return Case(model_cls(cfg), (_ids(),), _layers("model.layers.{}.self_attn.q_proj.weight"),
                _layers("model.layers.{}.mlp.up_proj.weight"), "model.embed_tokens.weight")


def llama() -> Case:
    return _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM)


def llama_tied() -> Case:
    return _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    tie_word_embeddings=True)


def mistral() -> Case:
    return _decoder(transformers.MistralConfig, transformers.MistralForCausalLM,
                    sliding_window=4)


def qwen2() -> Case:
    return _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM)


def vit() -> Case:
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=16, patch_size=8,
                                 num_labels=5)
    x = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return Case(transformers.ViTForImageClassification(cfg), (x,),
                _layers("vit.layers.{}.attention.q_proj.weight"),
                _layers("vit.layers.{}.mlp.fc1.weight"),
                "vit.embeddings.patch_embeddings.projection.weight", notes={"hidden_dim": 0})


def bart() -> Case:
    cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=48, decoder_ffn_dim=48,
                                  max_position_embeddings=32, use_cache=False)
    model = LogitsOnly(transformers.BartForConditionalGeneration(cfg))
    ids = _ids()
    return Case(model, (ids, torch.ones(B, N, dtype=torch.long), ids[:, :6]),
                ("model.model.encoder.layers.0.self_attn.q_proj.weight",
                 "model.model.decoder.layers.0.self_attn.q_proj.weight",
                 "model.model.decoder.layers.0.encoder_attn.q_proj.weight"),
                ("model.model.encoder.layers.0.fc1.weight", "model.model.decoder.layers.0.fc1.weight"),
                "model.model.shared.weight")


def t5() -> Case:
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                num_heads=4, use_cache=False)
    model = LogitsOnly(transformers.T5ForConditionalGeneration(cfg))
    ids = _ids()
    return Case(model, (ids, torch.ones(B, N, dtype=torch.long), ids[:, :6]),
                # cross-attention: its bias is a literal zeros((1, n_heads, ...)), whose
                # n_heads follows the heads (a uniform factory)
                ("model.encoder.block.0.layer.0.SelfAttention.q.weight",
                 "model.decoder.block.0.layer.0.SelfAttention.q.weight",
                 "model.decoder.block.0.layer.1.EncDecAttention.q.weight"),
                ("model.encoder.block.0.layer.1.DenseReluDense.wi.weight",
                 "model.decoder.block.0.layer.2.DenseReluDense.wi.weight"),
                "model.shared.weight")


MODELS = {"bert": bert, "roberta": roberta, "gpt2": gpt2, "llama": llama, "mistral": mistral,
          "qwen2": qwen2, "vit": vit, "bart": bart, "t5": t5}
FAST = ("bert", "gpt2", "llama")  # one of each family outside "slow"


def build(name: str) -> Case:
    torch.manual_seed(0)
    case = MODELS[name]()
    case.model.eval()
    return case


def capture(case: Case) -> torch.fx.GraphModule:
    return fxprune.trace(case.model, case.inputs, frontend="export")


def _shrunk(original: torch.nn.Module, small: torch.nn.Module, fqn: str, dim: int) -> bool:
    before = dict(original.named_parameters(remove_duplicate=False))[fqn]
    after = dict(small.named_parameters(remove_duplicate=False))[fqn]
    return after.shape[dim] < before.shape[dim]


def prune_and_check(name: str, policy: str, check_pruned, helpers) -> dict:
    """Analyse, prune every group at random, check; returns one coverage row."""
    case = build(name)
    before = helpers.snapshot(case.model)
    gm = capture(case)
    analysis = fxprune.analyze(gm, case.inputs, split_policy=policy)
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=0,
                                   include_softmax=True)  # the sweep prunes every group
    assert {g.name for g in analysis.groups if g.size >= 2} <= set(plan.keep)
    pruned = check_pruned(gm, case.inputs, plan)
    assert pruned.report.nodes_checked > 0
    assert pruned.report.params_after < pruned.report.params_before
    for fqn in case.heads:
        assert _shrunk(gm, pruned.small, fqn, case.qkv_dim), f"{fqn}: heads not pruned"
    for fqn in case.mlp:
        assert _shrunk(gm, pruned.small, fqn, 0), f"{fqn}: MLP width not pruned"
    if case.hidden is not None:
        dim = case.notes.get("hidden_dim", 1)
        assert _shrunk(gm, pruned.small, case.hidden, dim), "hidden size not pruned"
    helpers.assert_untouched(case.model, before)
    return {"model": name, "policy": policy, "groups": len(analysis.groups),
            "exact": sum(g.exact for g in analysis.groups), "verified": pruned.report.ok,
            "params": (pruned.report.params_before, pruned.report.params_after)}


def _marks(name: str) -> list:
    return [] if name in FAST else [pytest.mark.slow]


@pytest.mark.parametrize("policy", ["outer", "inner"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in MODELS])
def test_hf_model(name, policy, check_pruned, helpers):
    prune_and_check(name, policy, check_pruned, helpers)


# ----------------------------------------------------------------------------------
# Structures
# ----------------------------------------------------------------------------------
def _group_with(analysis, fqn: str, dim: int = 0):
    found = [g for g in analysis.groups if any(m.fqn == fqn and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{fqn}[{dim}] in {len(found)} groups"
    return found[0]


def test_gqa_heads_prune_whole_key_value_groups(check_pruned):
    """outer: a unit is one key/value head with its n_rep query heads; the repeat factor
    (the expand literal of repeat_kv) is kept, the kv head count follows the plan."""
    case = build("llama")
    gm = capture(case)
    analysis = fxprune.analyze(gm, case.inputs, split_policy="outer")
    p = "model.layers.0.self_attn."
    g = _group_with(analysis, p + "q_proj.weight")
    assert g.exact and g.size == 2 and g.granularity == 2 * 8  # 2 kv heads x (2 q heads x 8)
    assert {m.fqn for m in g.members} >= {p + n + ".weight" for n in ("q_proj", "k_proj",
                                                                       "v_proj", "o_proj")}
    plan = fxprune.Plan.from_indices(analysis, {g.name: [1]})
    small = check_pruned(gm, case.inputs, plan).small
    assert small.get_parameter(p + "q_proj.weight").shape[0] == 16  # query heads 2, 3
    assert small.get_parameter(p + "k_proj.weight").shape[0] == 8   # kv head 1
    expands = [n.args[1] for n in small.graph.nodes if "expand" in str(n.target)
               and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 5]
    assert expands and all(sizes[1:3] == [1, 2] for sizes in expands[:2]), expands


def test_rotary_head_dim_units_are_pairs(check_pruned):
    """inner: rotate_half pairs dim i with i + head_dim/2 and both read inv_freq[i]: a unit
    is a pair in every q and k head; the softmax scale stays 1/sqrt(original head_dim)."""
    case = build("llama")
    gm = capture(case)
    analysis = fxprune.analyze(gm, case.inputs, split_policy="inner")
    g = _group_with(analysis, "model.layers.0.self_attn.q_proj.weight")
    assert g.exact and g.size == 4  # head_dim 8 -> 4 rotary pairs
    inv = next(m for m in g.members if m.fqn == "model.rotary_emb.inv_freq")
    q = next(m for m in g.members if m.fqn == "model.layers.0.self_attn.q_proj.weight")
    for unit in range(4):
        rows = q.indices(unit)
        assert set(rows % 8) == {unit, unit + 4} and len(rows) == 2 * 4
        assert inv.indices(unit).tolist() == [unit]
    # every layer shares the rotary table, so every layer's q/k pairs are one group
    assert _group_with(analysis, "model.layers.1.self_attn.k_proj.weight") is g
    plan = fxprune.Plan.from_indices(analysis, {g.name: [0, 2]})
    small = check_pruned(gm, case.inputs, plan).small
    assert small.get_buffer("model.rotary_emb.inv_freq").shape == (2,)
    scales = {n.kwargs.get("scale") for n in small.graph.nodes
              if "scaled_dot_product_attention" in str(n.target)}
    assert len(scales) == 1 and scales.pop() == pytest.approx(1 / math.sqrt(8))


def test_swiglu_gate_and_up_are_coupled():
    case = build("llama")
    analysis = fxprune.analyze(capture(case), case.inputs)
    g = _group_with(analysis, "model.layers.0.mlp.gate_proj.weight")
    roles = {(m.fqn.rsplit(".", 2)[1], m.dim, m.role) for m in g.members}
    assert roles == {("gate_proj", 0, "out"), ("up_proj", 0, "out"), ("down_proj", 1, "in")}
    assert g.exact and g.size == 48


@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
def test_tied_embeddings_are_sliced_once(name, check_pruned):
    """The input embedding and the LM head share one parameter: one set of units, one
    sliced tensor, still shared after compile."""
    torch.manual_seed(0)
    case = (llama_tied if name == "llama_tied" else gpt2)()
    case.model.eval()
    gm = capture(case)
    head = "lm_head.weight"
    assert gm.get_parameter(head) is gm.get_parameter(case.hidden)
    analysis = fxprune.analyze(gm, case.inputs, split_policy="outer")
    assert sum(1 for (fqn, dim) in analysis.tensor_labels if fqn in (head, case.hidden)) == 2
    hidden = _group_with(analysis, case.hidden, 1)
    plan = fxprune.Plan.from_indices(analysis, {hidden.name: range(0, 32, 2)})
    pruned = check_pruned(gm, case.inputs, plan)
    small = pruned.small
    assert small.get_parameter(head) is small.get_parameter(case.hidden)
    assert small.get_parameter(head).shape == (V, 16)
    assert pruned.report.params_after == sum(p.numel() for p in small.parameters())


def test_exported_graph_has_no_hidden_regions():
    """Rotary tables are computed under no_grad: the region is inlined between explicit
    grad-mode switches, so its ops are analysed; the model still runs the same."""
    case = build("llama")
    gm = capture(case)
    assert not any("wrap_with_set_grad_enabled" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        want = case.model(*case.inputs).logits
        got = gm(*case.inputs).logits
    assert torch.equal(want, got)
    assert torch.is_grad_enabled()


# ----------------------------------------------------------------------------------
# Bad input: typed errors that name the module and what would be valid
# ----------------------------------------------------------------------------------
def test_gqa_plan_that_breaks_the_repeat_factor_is_refused():
    case = build("llama")
    analysis = fxprune.analyze(capture(case), case.inputs, split_policy="outer")
    q = "model.layers.0.self_attn.q_proj.weight"
    ok = fxprune.Plan.from_tensor_indices(analysis, {q: [2, 3]}, block=8)  # kv head 1
    assert list(ok.keep.values()) == [(1,)]
    with pytest.raises(fxprune.PlanError) as err:
        fxprune.Plan.from_tensor_indices(analysis, {q: [0, 2]}, block=8)
    text = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in text and "k_proj.weight[0] 0-7" in text
    assert "valid sets of blocks here are 0-1 | 2-3" in text


def test_rotary_head_dim_cut_that_splits_pairs_is_refused():
    case = build("llama")
    analysis = fxprune.analyze(capture(case), case.inputs, split_policy="inner")
    q = "model.layers.0.self_attn.q_proj.weight"
    pairs = [h * 8 + j for h in range(4) for j in (0, 4, 1, 5)]  # keep pairs 0 and 1
    assert len(fxprune.Plan.from_tensor_indices(analysis, {q: pairs}).keep) == 1
    with pytest.raises(fxprune.PlanError) as err:
        fxprune.Plan.from_tensor_indices(analysis, {q: [h * 8 + j for h in range(4)
                                                         for j in range(6)]})
    text = str(err.value)
    assert "module 'model.layers.0.self_attn.q_proj'" in text
    assert "model.rotary_emb.inv_freq[0]" in text and "0,4,8,12" in text


class OutsideRotary(torch.nn.Module):
    """Rotary tables handed in from outside (untracked): head_dim cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.o = torch.nn.Linear(16, 16)

    def forward(self, x, cos):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = (t * cos + torch.cat([-t[..., 4:], t[..., :4]], -1) for t in (q, k))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, n, 16))


def test_head_dim_with_untracked_rotary_tables_is_refused_with_a_reason():
    x, cos = torch.randn(2, 5, 16), torch.randn(5, 8)
    analysis = fxprune.analyze(OutsideRotary(), (x, cos), frontend="export")
    with pytest.raises(fxprune.PlanError) as err:
        fxprune.Plan.from_tensor_indices(analysis, {"q.weight": range(8)})
    assert "module 'q'" in str(err.value) and "pinned" in str(err.value)
    assert "untracked" in str(err.value)


# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, layers, per_layer", [
    ("llama", 2, "model.layers.{}"), ("gpt2", 2, "transformer.h.{}"),
    ("bert", 4, None)])  # post-LN BERT: a LayerNorm between the halves, two blocks a layer
def test_layer_pruning_through_export(name, layers, per_layer):
    """Transformer layers found in the exported graph (casts between a layer's two adds
    bridged; GPT-2's parameter-free x + 0.044715 x**3 inside its GELU is no layer), one
    removed, equal to the model with its branches zeroed, its parameters gone."""
    case = build(name)
    analysis = fxprune.analyze(case.model, case.inputs, frontend="export")
    blocks = fxprune.find_blocks(analysis)
    assert len(blocks) == layers
    if per_layer:
        assert [b.name for b in blocks] == [per_layer.format(i) for i in range(layers)]
        assert all(len(b.residuals) == 2 for b in blocks)  # attention and MLP halves
    scores = fxprune.block_similarity(analysis, blocks, case.inputs)
    assert scores.shape == (layers,) and ((-1 <= scores) & (scores <= 1)).all()
    drop = [blocks[int(scores.argmax())]]  # the layer that changes its input least
    small = fxprune.remove_blocks(analysis, drop)
    assert fxprune.verify_blocks(analysis, small, drop, case.inputs) <= 1e-6
    before = sum(p.numel() for p in case.model.parameters())
    assert sum(p.numel() for p in small.parameters()) == before - drop[0].num_params > 0


def test_head_dim_attention_scale_recomputed_on_request():
    """LLaMA passes ``scale=self.scaling`` (1/sqrt(head_dim)) to SDPA: kept by default,
    1/sqrt(kept head_dim) with ``attention_scale="recompute"``; verify checks the
    slicing at the original scale and this model by shapes."""
    case = build("llama")
    analysis = fxprune.analyze(case.model, case.inputs, frontend="export",
                               split_policy="inner")
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random")
    scales = {}
    for mode in ("original", "recompute"):
        small = fxprune.compile(case.model, plan, attention_scale=mode)
        sdpa = [n for n in small.graph.nodes if "scaled_dot_product" in str(n.target)]
        scales[mode] = {round(n.kwargs.get("scale"), 6) for n in sdpa}
        assert fxprune.verify(case.model, small, plan, case.inputs).ok
    head_dim = 32 // 4
    assert scales["original"] == {round(head_dim ** -0.5, 6)}
    assert scales["recompute"] == {round((head_dim // 2) ** -0.5, 6)}


def coverage_rows() -> list[dict]:
    """One row per model and policy (for docs/transformers.md)."""
    class H:
        pass
    from tests.conftest import _check_pruned, assert_untouched, snapshot

    helpers = H()
    helpers.snapshot, helpers.assert_untouched = snapshot, assert_untouched
    return [prune_and_check(name, policy, _check_pruned, helpers)
            for name in MODELS for policy in ("outer", "inner")]


if __name__ == "__main__":  # pragma: no cover - documentation helper
    from tabulate import tabulate

    torch.set_num_threads(1)
    rows = coverage_rows()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(tabulate([(r["model"], "export", r["policy"], r["groups"], r["exact"],
                     "yes" if r["verified"] else "NO", f"{r['params'][0]:,} -> {r['params'][1]:,}")
                    for r in rows],
                   headers=["model", "front-end", "heads", "groups", "exact", "slice == mask",
                            "params (50% of every group)"], tablefmt="github"))
    sys.exit(0)
