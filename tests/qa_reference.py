"""An independent scorer for multiple-choice items (plain forward passes, no lm-eval), shared by the harness
agreement tests of every real model."""

from __future__ import annotations

import torch

_cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str, max_length: int = 512) -> float:
    """log p(continuation | context), unbatched, with lm-eval's split of the trailing spaces between the two."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation).input_ids
    cont = whole[len(tok(context).input_ids):]
    assert cont
    key = (id(model), tuple(whole[-(max_length + 1):][:-1]))
    if key not in _cache:  # one forward for MMLU's four one-token answers
        _cache.clear()
        _cache[key] = torch.log_softmax(model(torch.tensor([key[1]])).logits[0].float(), dim=-1)
    return float(_cache[key][-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum())


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equals, like numpy


def near_tie(values: list[float], tie: float) -> bool:
    top = sorted(values, reverse=True)
    return top[0] - top[1] < tie
