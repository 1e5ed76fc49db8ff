"""Token windows for calibration (random, seeded) and perplexity (contiguous, non-overlapping).

Each window starts with the tokenizer's BOS token when it has one, so that every window is scored as the start of
a document whatever offset it was cut from. Windows carry a digest of their exact token ids and origin: the
cache key of everything computed from them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prunecomp.corpora.data import Split, load_text
from prunecomp.errors import PrunecompError

__all__ = ["HELD_OUT_SEED", "TokenWindows", "calibration_windows", "evaluation_windows",
           "held_out_windows", "tokenize_windows"]

HELD_OUT_SEED = 7919
"""Added to the calibration seed to draw held-out windows (which are then kept disjoint from the calibration
ones)."""


@dataclass(frozen=True)
class TokenWindows:
    """``ids``: ``[n, seq_len]`` int64; ``origin``: what text they came from; ``digest``: sha256 of both."""

    ids: Tensor
    origin: str
    digest: str

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])


def _digest(ids: Tensor, origin: str) -> str:
    h = hashlib.sha256(origin.encode())
    h.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _tokens(tokenizer: object, text: str) -> Tensor:
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)  # type: ignore[operator]
    return torch.tensor(enc["input_ids"], dtype=torch.int64)


def tokenize_windows(
    tokenizer: object,
    text: str,
    origin: str,
    *,
    seq_len: int,
    n_windows: int | None,
    seed: int | None,
) -> TokenWindows:
    """Cut ``text`` into windows of ``seq_len`` tokens (BOS included).

    ``seed=None``: the first ``n_windows`` contiguous non-overlapping windows (all of them if ``None``), the
    perplexity protocol. Otherwise ``n_windows`` windows at seeded random offsets, the calibration protocol.
    """
    if seq_len < 2:
        raise PrunecompError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if n_windows is not None and n_windows <= 0:
        raise PrunecompError(f"the number of windows must be positive, got {n_windows}")
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    tokens = _tokens(tokenizer, text)
    if tokens.numel() < body:
        raise PrunecompError(
            f"text from {origin} is too short: {tokens.numel()} tokens, need at least {body} for one window of "
            f"{seq_len} tokens"
        )
    if seed is None:
        count = tokens.numel() // body
        if n_windows is not None:
            count = min(count, n_windows)
        starts = [i * body for i in range(count)]
    else:
        assert n_windows is not None
        starts = _random_starts(tokens.numel(), body, n_windows, seed)
    return _cut(tokens, starts, body, bos, origin)


def _random_starts(n_tokens: int, body: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - body + 1, (n,), generator=gen).tolist()


def _cut(tokens: Tensor, starts: list[int], body: int, bos: int | None, origin: str) -> TokenWindows:
    rows = [tokens[s : s + body] for s in starts]
    ids = torch.stack(rows)
    if bos is not None:
        ids = torch.cat([torch.full((ids.shape[0], 1), int(bos), dtype=torch.int64), ids], dim=1)
    return TokenWindows(ids=ids, origin=origin, digest=_digest(ids, origin))


def check_context(model_config: Any, seq_len: int, option: str) -> None:
    """Refuse windows longer than the model's context: positions it never saw make scores and perplexities
    meaningless (and cost quadratic attention time for nothing)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(model_config, dict):
        limit = model_config.get("max_position_embeddings", model_config.get("text_config", {}).get(
            "max_position_embeddings"))
    if isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise PrunecompError(f"{option} {seq_len} is longer than the model's context (max_position_embeddings "
                             f"{limit}); use at most {limit}")


def calibration_windows(
    tokenizer: object,
    source: str = "c4",
    *,
    n_samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> TokenWindows:
    """``n_samples`` random windows of ``seq_len`` tokens from the calibration split of ``source``."""
    text, origin = load_text(source, "calibration", data_dir)
    return tokenize_windows(tokenizer, text, origin, seq_len=seq_len, n_windows=n_samples, seed=seed)


def evaluation_windows(
    tokenizer: object,
    source: str = "wikitext2",
    *,
    seq_len: int = 2048,
    max_windows: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    split: Split = "evaluation",
) -> TokenWindows:
    """Contiguous non-overlapping windows over the evaluation split of ``source`` (all, or the first N)."""
    text, origin = load_text(source, split, data_dir)
    return tokenize_windows(tokenizer, text, origin, seq_len=seq_len, n_windows=max_windows, seed=None)


def held_out_windows(
    tokenizer: object,
    source: str = "c4",
    *,
    n_windows: int,
    seq_len: int,
    calibration_samples: int,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    after: int = 0,
) -> TokenWindows:
    """``n_windows`` random windows of the calibration split of ``source`` that share no token position with the
    ``calibration_samples`` calibration windows of the same ``seed`` and ``seq_len`` (nor with each other): what
    the final check measures on, so that a run's own fit cannot flatter it.

    ``after``: skip the first ``after`` windows of the same draw and return the ``n_windows`` that follow,
    disjoint from those too. With ``after`` = the final check's count these are the windows on which a fitted
    stage is kept or declined, so that the final check stays independent of that decision."""
    text, origin = load_text(source, "calibration", data_dir)
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    tokens = _tokens(tokenizer, text)
    if tokens.numel() < body:
        raise PrunecompError(f"text from {origin} is too short for one window of {seq_len} tokens")
    taken = _random_starts(tokens.numel(), body, calibration_samples, seed)
    gen = torch.Generator().manual_seed(seed + HELD_OUT_SEED)
    starts: list[int] = []
    wanted = after + n_windows
    for _ in range(200 * wanted):
        if len(starts) == wanted:
            break
        start = int(torch.randint(0, tokens.numel() - body + 1, (1,), generator=gen))
        if all(abs(start - other) >= body for other in taken):
            starts.append(start)
            taken.append(start)
    if len(starts) < wanted:
        raise PrunecompError(f"text from {origin} ({tokens.numel()} tokens) leaves no room for {wanted} held-out "
                             f"windows of {seq_len} tokens beside the {calibration_samples} calibration windows")
    return _cut(tokens, starts[after:], body, bos,
                f"{origin} held-out({seed})" + (f" after {after}" if after else ""))

