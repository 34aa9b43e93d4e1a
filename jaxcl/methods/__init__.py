"""Continual-learning methods, one module each, found by name (``jaxcl list``).

See :mod:`jaxcl.methods.base` for the contract every method follows.
"""
from __future__ import annotations

import importlib
import pkgutil

from jaxcl.methods.base import Method, Phase, State


def available() -> list[str]:
    """Names of the method modules in this package."""
    import jaxcl.methods as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "base")


def on_a_vit() -> list[str]:
    """The methods that run on a pretrained ViT's token interface (their module's
    ``BACKBONE = "vit"``): the prompt-based and pretrained-model methods."""
    return [n for n in available() if getattr(importlib.import_module(f"jaxcl.methods.{n}"), "BACKBONE", "") == "vit"]


def build(config, model, info) -> Method:
    """``jaxcl.methods.<config.method.name>.make(config, model, info)``."""
    name = config.method.name
    if name not in available():
        raise ValueError(f"method.name: unknown method {name!r}; known: {', '.join(available())}")
    return importlib.import_module(f"jaxcl.methods.{name}").make(config, model, info)._replace(info=info)


def first_sentence(doc: str | None, limit: int = 100) -> str:
    """The first sentence of a docstring's first paragraph, for one-line listings."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = para.find(". ")
    text = para if end < 0 else para[: end + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(name: str) -> str:
    return first_sentence(importlib.import_module(f"jaxcl.methods.{name}").__doc__)


__all__ = ["Method", "Phase", "State", "available", "build", "describe", "on_a_vit"]
