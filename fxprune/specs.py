"""Model specs and example inputs for the command line (``fxprune.cli``).

    torchvision:NAME       torchvision.models.get_model(NAME), random init
    timm:NAME              timm.create_model(NAME, pretrained=False)
    hf:ARCH                a small random-init Hugging Face model (bert, gpt2, llama, ...)
    hf:path/to/dir         AutoModel*.from_pretrained(dir) of a saved model (local only)
    module.path:factory    your callable returning a model or a (model, inputs) pair

Nothing is downloaded. A misspelt name gets a "did you mean" from ``difflib``. Errors are
``ModelSpecError`` with the remedy in one line.
"""
from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fxprune.errors import FxpruneError

__all__ = ["ModelSpecError", "LoadedModel", "load_model", "HF_ARCHS", "DTYPES", "make_inputs"]


class ModelSpecError(FxpruneError):
    """A ``MODEL`` argument could not be turned into a model (bad spec, import, factory)."""


@dataclass(frozen=True)
class LoadedModel:
    spec: str
    model: Any                      # torch.nn.Module, in eval mode
    example_inputs: tuple | None    # from a factory returning (model, inputs)
    text: bool = False              # integer token inputs (a language model)
    vocab_size: int = 0
    frontend: str = "auto"
    notes: dict = field(default_factory=dict)


#: hf:ARCH -> (config class, model class): small random-init configs (2 layers, width 64)
HF_ARCHS = {
    "bert": ("BertConfig", "BertForMaskedLM"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
_HF_SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64)
_HF_EXTRA = {
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=128,
                 use_cache=False),
    "llama": dict(_HF_SMALL, num_key_value_heads=2, use_cache=False),
    "mistral": dict(_HF_SMALL, num_key_value_heads=2, use_cache=False),
    "qwen2": dict(_HF_SMALL, num_key_value_heads=2, use_cache=False),
    "roberta": dict(_HF_SMALL, pad_token_id=1),
}

DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def load_model(spec: str) -> LoadedModel:
    """A ``MODEL`` spec -> a model in eval mode (see the module docstring)."""
    import torch

    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ModelSpecError(f"model spec {spec!r} names no model: use torchvision:NAME, "
                             "timm:NAME, hf:ARCH, hf:DIR or module.path:factory")
    loaders = {"torchvision": _torchvision, "timm": _timm, "hf": _hf}
    if source in loaders:
        loaded = loaders[source](spec, name)
    else:
        loaded = _factory(spec, source, name)
    if not isinstance(loaded.model, torch.nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(loaded.model).__name__}, "
                             "not an nn.Module")
    loaded.model.eval()
    return loaded


def _torchvision(spec: str, name: str) -> LoadedModel:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelSpecError("torchvision is not installed: pip install torchvision") from exc
    names = torchvision.models.list_models()
    if name not in names:
        raise ModelSpecError(f"torchvision has no model {name!r}{_suggest(name, names)} "
                             "(see torchvision.models.list_models())")
    return LoadedModel(spec, torchvision.models.get_model(name, weights=None), None)


def _timm(spec: str, name: str) -> LoadedModel:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError("timm is not installed: pip install timm") from exc
    names = timm.list_models()
    if name not in names:
        raise ModelSpecError(f"timm has no model {name!r}{_suggest(name, names)} "
                             "(see timm.list_models())")
    return LoadedModel(spec, timm.create_model(name, pretrained=False), None)


def _hf(spec: str, name: str) -> LoadedModel:
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError("transformers is not installed: pip install transformers") from exc
    if os.path.isdir(name):
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        auto = (transformers.AutoModelForCausalLM
                if any(a.endswith("ForCausalLM") for a in config.architectures or ())
                else transformers.AutoModel)
        model = auto.from_pretrained(name, local_files_only=True)
        return LoadedModel(spec, model, None, text=True, vocab_size=config.vocab_size,
                           frontend="export")
    if name not in HF_ARCHS:
        hint = _suggest(name, HF_ARCHS) or f"; known: {', '.join(HF_ARCHS)}"
        raise ModelSpecError(f"hf:{name} is neither a known architecture nor a local "
                             f"directory{hint}")
    config_cls, model_cls = (getattr(transformers, n) for n in HF_ARCHS[name])
    config = config_cls(**_HF_EXTRA.get(name, _HF_SMALL))
    return LoadedModel(spec, model_cls(config), None, text=True,
                       vocab_size=config.vocab_size, frontend="export")


def _factory(spec: str, module_path: str, attr: str) -> LoadedModel:
    import torch

    try:
        obj: Any = importlib.import_module(module_path)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_path!r}: {exc} (model sources: "
                             "torchvision, timm, hf, or module.path:factory)"
                             f"{_suggest(module_path, ('torchvision', 'timm', 'hf'))}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelSpecError(f"{module_path!r} has no attribute {attr!r}"
                                 f"{_suggest(part, public)}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ModelSpecError(f"{module_path}:{attr} is neither a callable nor an "
                                 "nn.Module")
        try:
            obj = obj()
        except Exception as exc:  # the user's factory: report, don't trace back into it
            raise ModelSpecError(f"{module_path}:{attr}() failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
    inputs = None
    if isinstance(obj, tuple) and len(obj) == 2:
        obj, raw = obj
        inputs = (raw,) if isinstance(raw, torch.Tensor) else tuple(raw)
    return LoadedModel(spec, obj, inputs)


def make_inputs(loaded: LoadedModel, shapes: Sequence[tuple[int, ...]] | None,
                dtype: str | None) -> tuple:
    """Example inputs: ``--input-shape`` (random of ``dtype``; integer dtypes draw token ids
    below the model's vocabulary), else the factory's, else ``1,3,224,224`` (images) or
    ``1,16`` int64 tokens (text models)."""
    import torch

    if not shapes and loaded.example_inputs is not None and dtype is None:
        return loaded.example_inputs
    kind = dtype or ("int64" if loaded.text else "float32")
    shapes = shapes or ([(1, 16)] if loaded.text else [(1, 3, 224, 224)])
    torch_dtype = getattr(torch, kind)
    if torch_dtype == torch.bool:
        return tuple(torch.ones(s, dtype=torch.bool) for s in shapes)
    if not torch_dtype.is_floating_point:
        high = loaded.vocab_size or 100
        return tuple(torch.randint(0, high, s, dtype=torch_dtype) for s in shapes)
    return tuple(torch.randn(s).to(torch_dtype) for s in shapes)
