"""``--input [NAME=]SHAPE[:DTYPE]`` (positional and keyword inputs) and ``--uniform``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxprune.cli import main
from fxprune.specs import InputSpec, InputSpecError, LoadedModel, make_inputs, parse_input

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _models_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_parse_input_forms():
    assert parse_input("1x3x8x8") == InputSpec(None, (1, 3, 8, 8))
    assert parse_input("input_ids=1x16:int64") == InputSpec("input_ids", (1, 16), "int64")
    assert parse_input("2,8:float16") == InputSpec(None, (2, 8), "float16")
    for bad, why in [("ids=1x0", "not positive"), ("1x16:int65", "did you mean int64"),
                     ("in-ids=1x16", "not a parameter name"), ("ids=", "not positive"),
                     ("ids=1xa", "not positive")]:
        with pytest.raises(InputSpecError, match=why):
            parse_input(bad)


def _text() -> LoadedModel:
    from _cli_models import tiny_text

    return LoadedModel("t", tiny_text(), None, text=True, vocab_size=20)


def test_keyword_inputs_take_their_place_in_forward():
    specs = [InputSpec("input_ids", (2, 6)), InputSpec("token_type_ids", (2, 6))]
    ids, mask, types = make_inputs(_text(), None, "int64", specs)
    assert ids.shape == (2, 6) and ids.dtype == torch.int64 and int(ids.max()) < 20
    assert mask is None  # a parameter between named ones keeps its default
    assert torch.equal(types, torch.zeros(2, 6, dtype=torch.int64))
    ids, mask = make_inputs(_text(), None, None, [InputSpec(None, (1, 4), "int32"),
                                                  InputSpec("attention_mask", (1, 4))])
    assert ids.dtype == torch.int32 and torch.equal(mask, torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(InputSpecError, match=r"no such parameter.*did you mean attention_mask"):
        make_inputs(_text(), None, None, [InputSpec("attn_mask", (1, 4))])
    with pytest.raises(InputSpecError, match=r"needs 'input_ids'.*--input input_ids="):
        make_inputs(_text(), None, None, [InputSpec("token_type_ids", (1, 4))])


@pytest.mark.parametrize("argv, message", [
    (["--input", "ids=1x0"], "shape '1x0' is not positive integers"),
    (["--input", "1x8:int65"], "did you mean int64"),
    (["--input", "input_ids=1x8", "--input", "1x8"], "give positional inputs first"),
    (["--input", "input_ids=1x8", "--input", "input_ids=1x8"], "given twice"),
    (["--input", "1x8", "--input-shape", "1,8"], "not both"),
])
def test_bad_input_specs_exit_2_before_any_work(argv, message, capsys, monkeypatch):
    import fxprune.specs

    def no_load(spec):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fxprune.cli, "load_model", no_load)
    assert main(["prune", "_cli_models:tiny_text", "--ratio", "0.5"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "error" in err[-1]


def test_unknown_keyword_exits_2_naming_the_parameters(capsys):
    assert main(["inspect", "_cli_models:tiny_text", "--input", "input_id=1x8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean input_ids" in err[0]
    assert "input_ids, attention_mask, token_type_ids" in err[0]


def test_prune_with_keyword_inputs_and_uniform(capsys):
    assert main(["prune", "_cli_models:tiny_text", "--ratio", "0.5", "--uniform", "--quiet",
                 "--input", "input_ids=2x5:int64", "--input", "attention_mask=2x5:int64"]) == 0
    out = capsys.readouterr().out
    assert "(l1, uniform)" in out and "slice == mask OK" in out


def test_uniform_with_a_saved_plan_is_refused(capsys, tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text("{}")
    assert main(["prune", "_cli_models:tiny_text", "--plan", str(plan), "--uniform"]) == 2
    assert "--uniform shapes a new plan" in capsys.readouterr().err


def test_fx_capture_fixes_optional_inputs_left_none():
    """Passed as None or not passed (None default): traced as None, not as a tensor."""
    import fxprune
    from _cli_models import TinyText

    model = TinyText().eval()
    ids, types = torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    for inputs in [(ids,), (ids, None, types)]:
        analysis = fxprune.analyze(model, inputs, frontend="fx")
        targets = {str(n.target) for n in analysis.gm.graph.nodes}
        assert "unsqueeze" not in targets  # the mask branch was not traced
        assert ("types" in targets) == (len(inputs) == 3)
        with torch.no_grad():
            torch.testing.assert_close(analysis.gm(*inputs), model(*inputs))
