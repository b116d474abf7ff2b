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

from fxprune.core.errors import FxpruneError

__all__ = ["ModelSpecError", "LoadedModel", "load_model", "HF_ARCHS", "DTYPES", "make_inputs",
           "InputSpec", "parse_input", "InputSpecError"]


class ModelSpecError(FxpruneError):
    """A ``MODEL`` argument could not be turned into a model (bad spec, import, factory)."""


class InputSpecError(ModelSpecError, ValueError):
    """An ``--input`` spec is malformed, or names no parameter of the model's forward."""


@dataclass(frozen=True)
class InputSpec:
    """One ``--input [NAME=]SHAPE[:DTYPE]``: a keyword input when ``name`` is set."""

    name: str | None
    shape: tuple[int, ...]
    dtype: str | None = None


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


def parse_input(text: str) -> InputSpec:
    """``"input_ids=1x16:int64"`` / ``"1x3x224x224"`` / ``"2,8:float16"`` -> ``InputSpec``;
    ``InputSpecError`` (one line, with the expected form) when malformed."""
    form = "expected [NAME=]SHAPE[:DTYPE], e.g. input_ids=1x16:int64 or 1x3x224x224"
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = None, text
    elif not name.isidentifier():
        raise InputSpecError(f"bad input {text!r}: {name!r} is not a parameter name ({form})")
    shape_text, _, dtype = rest.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise InputSpecError(f"bad input {text!r}: shape {shape_text!r} is not positive "
                             f"integers ({form})")
    if dtype and dtype not in DTYPES:
        raise InputSpecError(f"bad input {text!r}: dtype {dtype!r} is not one of "
                             f"{', '.join(DTYPES)}{_suggest(dtype, DTYPES)}")
    return InputSpec(name, shape, dtype or None)


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
                dtype: str | None, specs: Sequence[InputSpec] | None = None) -> tuple:
    """Example inputs: ``specs`` (``--input``: positional ones first, keyword ones placed by
    the forward's signature, parameters between them at their defaults), else
    ``--input-shape`` (random of ``dtype``; integer dtypes draw token ids below the model's
    vocabulary), else the factory's, else ``1,3,224,224`` (images) or ``1,16`` int64
    tokens (text models). Integer inputs named like masks are ones, ``token_type_ids``
    zeros, ``position_ids`` ``0..n-1``."""
    if specs:
        return _spec_inputs(loaded, specs, dtype)
    if not shapes and loaded.example_inputs is not None and dtype is None:
        return loaded.example_inputs
    shapes = shapes or ([(1, 16)] if loaded.text else [(1, 3, 224, 224)])
    return tuple(_random(loaded, InputSpec(None, s, dtype)) for s in shapes)


def _random(loaded: LoadedModel, spec: InputSpec, default: str | None = None) -> Any:
    import torch

    kind = spec.dtype or default or ("int64" if loaded.text else "float32")
    torch_dtype = getattr(torch, kind)
    name = spec.name or ""
    if torch_dtype == torch.bool or (not torch_dtype.is_floating_point and "mask" in name):
        return torch.ones(spec.shape, dtype=torch_dtype)
    if torch_dtype.is_floating_point:
        return torch.randn(spec.shape).to(torch_dtype)
    if name == "token_type_ids":
        return torch.zeros(spec.shape, dtype=torch_dtype)
    if name == "position_ids":
        return torch.arange(spec.shape[-1], dtype=torch_dtype).expand(spec.shape).contiguous()
    return torch.randint(0, loaded.vocab_size or _smallest_vocab(loaded.model), spec.shape,
                         dtype=torch_dtype)


def _smallest_vocab(model: Any) -> int:
    """Token ids below every ``nn.Embedding``'s size index any of them (100 without one)."""
    import torch

    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return min(sizes, default=100)


def _spec_inputs(loaded: LoadedModel, specs: Sequence[InputSpec], dtype: str | None) -> tuple:
    """Positional inputs for ``specs``, keyword ones put in place by ``forward``'s signature."""
    import inspect

    named = {s.name: s for s in specs if s.name}
    values = [_random(loaded, s, dtype) for s in specs if not s.name]
    if not named:
        return tuple(values)
    params = [p for p in inspect.signature(loaded.model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = [n for n in named if n not in names[len(values):]]
    if unknown:
        taken = f" ({', '.join(names[:len(values)])} given positionally)" if values else ""
        raise InputSpecError(f"--input {unknown[0]}=...: {type(loaded.model).__name__}.forward "
                             f"has no such parameter{taken}{_suggest(unknown[0], names)} (its "
                             f"parameters: {', '.join(names) or 'none'})")
    last = max(names.index(n) for n in named)
    for p in params[len(values):last + 1]:
        if p.name in named:
            values.append(_random(loaded, named[p.name], dtype))
        elif p.default is not p.empty:
            values.append(p.default)
        else:
            raise InputSpecError(f"{type(loaded.model).__name__}.forward needs {p.name!r} "
                                 f"before {next(iter(named))!r}: add --input "
                                 f"{p.name}=SHAPE[:DTYPE]")
    return tuple(values)
