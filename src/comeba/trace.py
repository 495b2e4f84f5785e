"""A small tracing primitive: read or change named modules' inputs and outputs.

In the spirit of MEMIT's `nethook`: one context manager that records what
named modules receive and return, optionally rewrites an output, and can stop
the forward pass after a module so that nothing past it is computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; `trace` swallows it."""


@dataclass
class Record:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module value of type {type(value).__name__}")


def _replace_first(value, tensor: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return tensor
    return (tensor, *value[1:]) if isinstance(value, tuple) else [tensor, *value[1:]]


@contextmanager
def trace(
    model: torch.nn.Module,
    names: Sequence[str],
    *,
    inputs: bool = False,
    outputs: bool = False,
    edit_output: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    stop_after: str | None = None,
) -> Iterator[dict[str, Record]]:
    """Record (and optionally edit) the first tensor in/out of each named module.

    Use as ``with trace(model, names, inputs=True, stop_after=last) as rec:
    run(model)``; a `StopForward` raised at `stop_after` ends the pass and is
    swallowed here. `edit_output(name, out)` must return a new tensor.
    """
    records = {name: Record() for name in names}
    handles = []
    try:
        for name in names:
            module = model.get_submodule(name)

            def hook(mod, args, out, name=name):
                if inputs:
                    records[name].input = _first_tensor(args)
                result = None
                if edit_output is not None:
                    result = _replace_first(out, edit_output(name, _first_tensor(out)))
                if outputs:
                    records[name].output = _first_tensor(result if result is not None else out)
                if name == stop_after:
                    raise StopForward
                return result

            handles.append(module.register_forward_hook(hook))
        if stop_after is not None and stop_after not in records:
            raise ValueError(f"stop_after {stop_after!r} is not one of the traced modules")
        try:
            yield records
        except StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
