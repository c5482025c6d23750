"""Pooling heads: one small module per method, one contract and one factory.

Every head is a :class:`PoolingHead` mapping a (B, C, H, W) feature map to (B, ``head.output_dim``);
:mod:`finegrained.heads.base` lists what the contract declares (logits, auxiliary loss, data-dependent
initialisation, export substitute). The registry here maps names to heads and their display names.

    >>> head = build_head("isqrt", in_channels=2048)           # 1x1 conv to 256 + iSQRT
    >>> head.output_dim
    32896
    >>> head_display_name("isqrt")
    'iSQRT-COV'

Heads built on an eigendecomposition (``mpncov``, ``o2p``, ``g2de``) carry an eigendecomposition-free
substitute for ONNX, which has no eigensolver; :func:`onnx_substitutes` switches it on.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Dict, Iterator, List, Optional, Type

from torch import nn

from finegrained.heads.base import PoolingHead

__all__ = ["PoolingHead", "register_head", "available_heads", "head_display_name", "head_paper", "build_head", "head_arguments",
           "check_head_arguments", "onnx_substitutes"]

_REGISTRY: Dict[str, Type[PoolingHead]] = {}
_DISPLAY_NAMES: Dict[str, str] = {}


def register_head(name: str, display_name: Optional[str] = None):
    """Class decorator that makes a :class:`PoolingHead` available to :func:`build_head` under ``name``.

    ``display_name`` is the method's name as its paper spells it (tables, reports); default ``name``.
    """

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"head {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, PoolingHead)):
            raise TypeError(f"head {name!r}: {cls!r} does not follow the head contract "
                            f"(subclass finegrained.heads.PoolingHead)")
        _REGISTRY[name] = cls
        _DISPLAY_NAMES[name] = display_name or name
        return cls

    return wrap


def available_heads() -> List[str]:
    """Names accepted by :func:`build_head`, sorted."""
    return sorted(_REGISTRY)


def _head_class(name: str) -> Type[PoolingHead]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(available_heads())}") from None


def head_display_name(name: str) -> str:
    """The method's name as its paper spells it, e.g. ``"G²DeNet"`` for ``"g2de"``."""
    _head_class(name)
    return _DISPLAY_NAMES[name]


def head_paper(name: str) -> str:
    """The paper to cite for the head ``name`` (its class's ``paper``)."""
    return _head_class(name).paper


def build_head(name: str, in_channels: int, num_classes: Optional[int] = None, class_token_dim: int = 0,
               **kwargs) -> PoolingHead:
    """Build the pooling head ``name`` for feature maps with ``in_channels`` channels.

    ``num_classes`` is passed only to heads that compute class scores themselves
    (``produces_logits``, e.g. ``lrbp``), ``class_token_dim`` (the backbone's class token size, 0 for none)
    only to heads that use the class token (``uses_class_token``, SoT); the others ignore them.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), an argument the head does not have or
            a value of the wrong type or range (the message lists the head's arguments), a value the layers cannot
            be built with, or a logit-producing head without ``num_classes``.
    """
    cls = _head_class(name)
    check_head_arguments(name, kwargs)
    if cls.uses_class_token:
        kwargs["class_token_dim"] = class_token_dim
    if cls.produces_logits:
        if num_classes is None:
            raise ValueError(f"head {name!r} computes class scores itself and needs num_classes")
        kwargs["num_classes"] = num_classes
    try:
        return cls(in_channels, **kwargs)
    except (RuntimeError, ValueError) as err:  # a value the layers cannot be built with (sizes, ranges)
        raise ValueError(f"head {name!r} cannot be built with head_kwargs {kwargs} on {in_channels} input channels: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


# Arguments the model passes itself, not head_kwargs.
_GIVEN_BY_THE_MODEL = ("self", "in_channels", "num_classes", "class_token_dim")
# Integer arguments that may be 0 (everything else counts something: channels, iterations, clusters, ...).
_MAY_BE_ZERO = ("seed",)


def head_arguments(name: str) -> Dict[str, inspect.Parameter]:
    """The keyword arguments ``head_kwargs`` may set for head ``name``, with their defaults and annotations."""
    parameters = inspect.signature(_head_class(name).__init__).parameters
    return {k: p for k, p in parameters.items() if k not in _GIVEN_BY_THE_MODEL
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_head_arguments(name: str, kwargs: Dict) -> None:
    """Refuse an argument head ``name`` does not have, or a value of the wrong type or out of range, in one line
    that lists the head's arguments."""
    accepted = head_arguments(name)
    listing = ", ".join(f"{k}={p.default!r}" for k, p in accepted.items())
    for key, value in kwargs.items():
        if key not in accepted:
            raise ValueError(f"head {name!r} has no argument {key!r}; its arguments: {listing or 'none'}")
        default = accepted[key].default
        annotation = str(accepted[key].annotation)
        if value is None:
            if default is None or "Optional" in annotation:
                continue
            raise ValueError(f"head {name!r}: {key} may not be null (default {default!r})")
        expects = (bool if isinstance(default, bool) or annotation in ("bool", "<class 'bool'>") else
                   int if isinstance(default, int) or "int" in annotation.replace("Sequence[int]", "") else
                   float if isinstance(default, float) or "float" in annotation else
                   str if isinstance(default, str) or "str" in annotation else None)
        if expects is None:
            continue
        ok = (isinstance(value, bool) if expects is bool else
              isinstance(value, numbers.Integral) and not isinstance(value, bool) if expects is int else
              isinstance(value, numbers.Real) and not isinstance(value, bool) if expects is float else
              isinstance(value, str))
        if not ok:
            raise ValueError(f"head {name!r}: {key} must be a{'n' if expects is int else ''} {expects.__name__}, got "
                             f"{value!r}; its arguments: {listing}")
        if expects is int and value < (0 if key in _MAY_BE_ZERO else 1):
            raise ValueError(f"head {name!r}: {key} must be {'>= 0' if key in _MAY_BE_ZERO else 'a positive integer'}, "
                             f"got {value}")
        if expects is float and not math.isfinite(value):
            raise ValueError(f"head {name!r}: {key} must be a finite number, got {value}")


@contextlib.contextmanager
def onnx_substitutes(module: nn.Module) -> Iterator[List[str]]:
    """Inside the block, eigendecomposition heads in ``module`` compute their ONNX substitute.

    Yields the descriptions of the substitutes in use (empty when ``module`` has none).
    """
    heads = [m for m in module.modules() if isinstance(m, PoolingHead) and m.export_substitute() is not None]
    previous = [m.use_substitute for m in heads]
    for m in heads:
        m.use_substitute = True
    try:
        yield [m.export_substitute() for m in heads]
    finally:
        for m, flag in zip(heads, previous):
            m.use_substitute = flag


# Importing the modules registers the heads.
from finegrained.heads import (  # noqa: E402,F401
    bcnn, cbp, dropcov, g2de, gap, gmsop, hihca, improved_bcnn, isice, isqrt, kp, lrbp, mpa, mpncov, netfv, netvlad,
    o2p, sot, srsop)
