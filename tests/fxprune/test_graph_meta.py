"""fxprune's records on a GraphModule live in one dict, ``gm.meta["fxprune"]``."""
import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.graph_meta import KEYS, get_meta, set_meta


def test_one_namespace_that_survives_deepcopy():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    a = fxprune.analyze(model, (torch.randn(2, 4),))
    small = fxprune.compile(model, fxprune.Plan.from_ratio(a, 0.5, criterion="l1"))
    assert set(small.meta["fxprune"]) <= KEYS
    recorded = dict(small.meta["fxprune"])
    digest = recorded.pop("state_digest")  # compile's record of its result's tensors
    assert recorded == {"frontend": "fx", "attention_scale": "original"}
    assert set(digest) == set(small.state_dict())
    assert not [k for k in small.meta if k.startswith("fxprune_")]  # no loose keys
    assert copy.deepcopy(small).meta["fxprune"] == small.meta["fxprune"]


def test_a_misspelt_key_is_an_error_not_a_miss():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    assert get_meta(gm, "frontend") is None and get_meta(nn.Linear(2, 2), "tokens", 3) == 3
    with pytest.raises(KeyError, match="frontend"):
        get_meta(gm, "front_end")
    with pytest.raises(KeyError):
        set_meta(gm, "fxprune_tokens", 1)
