"""Quiet libraries: no telemetry, no progress bars of their own.

Why: the CLI draws its own progress bars, and a Prefect worker's log is the run's story: transformers'
weight-loading and GGUF de-quantising bars, hub download bars and tokenizer fork warnings would flood both.
Nothing happens at import; callers opt in.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["QUIET_ENV", "quiet_environment", "quiet_libraries"]

# tqdm reads TQDM_DISABLE when it is imported, so the console entry point (:mod:`flows.entry`) calls
# :func:`quiet_environment` before importing anything.
QUIET_ENV = {"DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1"}


def quiet_environment() -> None:
    """Set :data:`QUIET_ENV` where the user has not set those variables."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def quiet_libraries() -> None:
    """Turn off the progress bars of transformers, huggingface_hub and datasets in this process (works after they
    were imported, unlike ``TQDM_DISABLE``), and transformers' info/warning chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
