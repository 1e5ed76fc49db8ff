"""Scoped edits of a model: forward hooks registered inside a context manager that always removes them, and
tentative in-place edits that are undone unless kept."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["capture_layer_io", "restored"]

LayerCallback = Callable[[int, Tensor, Tensor], None]


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]  # type: ignore[index]


@contextmanager
def capture_layer_io(layers: nn.ModuleList, callback: LayerCallback) -> Iterator[None]:
    """Call ``callback(i, x_in, x_out)`` after every forward of layer ``i`` (residual stream in and out)."""
    inputs: dict[int, Tensor] = {}
    handles = []

    def pre(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = _hidden_in(args, kwargs)

        return hook

    def post(i: int) -> Callable:
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, output: object) -> None:
            callback(i, inputs.pop(i), _hidden_out(output))

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()


@contextmanager
def restored(tensors: Sequence[Tensor]) -> Iterator[Callable[[bool], None]]:
    """Edit ``tensors`` in place inside the block; they get their exact values back on exit (also on error)
    unless the block calls the yielded ``keep(True)``. Clones only these tensors, not the model."""
    saved = [(t, t.detach().clone()) for t in tensors]
    kept = [False]

    def keep(flag: bool) -> None:
        kept[0] = flag

    try:
        yield keep
    except BaseException:
        kept[0] = False
        raise
    finally:
        if not kept[0]:
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)
