"""The final model as an MLflow Model, in place: one copy of the weights serves every way of loading it.

Why: registry users load a version by alias (``mlflow.transformers.load_model("models:/NAME@champion")``), serve
it (``mlflow models serve -m models:/NAME@champion``), and deployment tools read its ``MLmodel``. MLflow's own
``save_model``/``log_model`` would write a second copy of the weights (twice 140 GB for a 70B model). Instead the
pipeline's final folder, already a plain HF checkpoint, gets the MLflow Model files beside the weights:

* ``MLmodel``: the ``transformers`` flavor (text-generation) with ``model_binary: .`` (the folder itself is the
  checkpoint) and a ``tokenizer`` component, plus the ``python_function`` flavor, a signature (prompt string ->
  generated string) and an input example;
* ``components/tokenizer/``: a copy of the tokenizer files (kilobytes to a few MB), where the flavor looks;
* ``requirements.txt``, ``python_env.yaml``, ``conda.yaml``: the pinned versions this run used.

The registered version's source is that folder, so ``from_pretrained``, ``prunecomp apply``, the evaluate flow,
``mlflow.transformers.load_model``, ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` all read the same
bytes (tested). The layout is what ``mlflow.transformers.save_model`` writes, except that the weights stay at the
top level instead of under ``model/``.

Promotion moves the ``champion`` alias only to a version whose files :func:`check_version_files` accepts: the
``_COMPLETE`` marker of a finished write, the MLflow Model files, every weight file a whole safetensors file (its
header parsed, its size exactly header + data) and the checkpoint's report naming the hash the version was
registered with. All of it is read from headers and small files, locally or on S3, never the weights: a 70B
version is checked in seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prunecomp.models.storage import MARKER, is_complete, is_remote
from tasks.settings import redact

__all__ = ["INPUT_EXAMPLE", "check_mlflow_model", "check_version_files", "requirements", "safetensors_problem",
           "write_mlflow_model"]

INPUT_EXAMPLE = "The capital of France is"
_TOKENIZER_DIR = "components/tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def requirements() -> list[str]:
    """Pinned requirements of the logged model: the versions this process runs."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "transformers", "tokenizers", "safetensors"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def write_mlflow_model(folder: Path, *, architecture: str, tokenizer_class: str, dtype: str,
                       source_name: str) -> None:
    """Add the MLflow Model files to ``folder``, a saved HF checkpoint with its tokenizer (see module docstring)."""
    import mlflow
    import transformers
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    tok = folder / _TOKENIZER_DIR
    tok.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tok / name)
    reqs = requirements()
    (folder / "requirements.txt").write_text("\n".join(reqs) + "\n")
    py = ".".join(str(v) for v in sys.version_info[:3])
    (folder / "python_env.yaml").write_text(
        f"python: {py}\nbuild_dependencies:\n- pip\n- setuptools\n- wheel\ndependencies:\n- -r requirements.txt\n")
    (folder / "conda.yaml").write_text("channels:\n- conda-forge\ndependencies:\n" f"- python={py}\n- pip\n- pip:\n"
                                       + "".join(f"  - {r}\n" for r in reqs) + "name: mlflow-env\n")
    (folder / "input_example.json").write_text(json.dumps(INPUT_EXAMPLE))
    (folder / "serving_input_example.json").write_text(json.dumps({"inputs": INPUT_EXAMPLE}, indent=2))
    model = Model(signature=ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")])),
                  saved_input_example_info={"artifact_path": "input_example.json", "type": "json_object",
                                            "serving_input_path": "serving_input_example.json"},
                  mlflow_version=mlflow.__version__)
    model.add_flavor("transformers", code=None, components=["tokenizer"], instance_type="TextGenerationPipeline",
                     model_binary=".", pipeline_model_type=architecture, source_model_name=source_name,
                     task="text-generation", tokenizer_type=tokenizer_class, torch_dtype=dtype,
                     transformers_version=transformers.__version__)
    mlflow.pyfunc.add_to_model(model, loader_module="mlflow.transformers", conda_env="conda.yaml",
                               python_env="python_env.yaml")
    model.save(str(folder / "MLmodel"))


def check_mlflow_model(source: str) -> str | None:
    """Why the model whose files live at ``source`` (a registered version's source) would not load through the
    transformers flavor, or ``None`` when it would: its ``MLmodel`` has the transformers and pyfunc flavors and the
    files they point at exist. Reads a few small files, never the weights (a 70B champion is checked in seconds)."""
    import yaml

    from tasks.files import exists, read_bytes

    try:
        doc = yaml.safe_load(read_bytes(f"{source.rstrip('/')}/MLmodel"))
    except Exception as exc:  # any failure to read MLmodel is the answer
        return f"no readable MLmodel ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    flavors: dict[str, Any] = (doc or {}).get("flavors") or {}
    if "transformers" not in flavors or "python_function" not in flavors:
        return f"MLmodel has flavors {sorted(flavors)}, not transformers + python_function"
    conf = flavors["transformers"]
    root = source.rstrip("/")
    binary = root if conf.get("model_binary") in (".", None) else f"{root}/{conf['model_binary']}"
    missing = [p for p in (f"{binary}/config.json", f"{root}/{_TOKENIZER_DIR}/tokenizer_config.json")
               if not exists(p)]
    if not (exists(f"{binary}/model.safetensors") or exists(f"{binary}/model.safetensors.index.json")):
        missing.append(f"{binary}/model.safetensors")
    return f"missing {', '.join(redact(p) for p in missing)}" if missing else None


MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header the format allows (the reference implementation refuses more): a bigger
length is a damaged file, and is never read."""

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _ranges(uri: str) -> tuple[int, Callable[[int, int], bytes]]:
    """The size of the file at ``uri`` and a reader of byte ranges of it: positioned reads locally, ranged GETs on
    an object store (never the whole file)."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()

        def read_local(start: int, end: int) -> bytes:
            with path.open("rb") as fh:
                fh.seek(start)
                return fh.read(end - start)

        return path.stat().st_size, read_local
    import fsspec

    fs, path_ = fsspec.core.url_to_fs(uri)
    return int(fs.size(path_)), lambda start, end: bytes(fs.cat_file(path_, start=start, end=end))


def safetensors_problem(uri: str) -> tuple[str | None, set[str]]:
    """Why the file at ``uri`` is not one whole safetensors file (``None`` when it is), and the tensor names its
    header lists. Whole means: a little-endian u64 header length, a JSON header whose every tensor has valid
    ``data_offsets``, and a file size of exactly 8 + header length + the largest end offset (a truncated upload
    or copy is shorter, a file with something appended is longer). Reads the header only."""
    try:
        size, read = _ranges(uri)
    except FileNotFoundError:
        return f"{redact(uri)} is missing", set()
    except Exception as exc:  # an unreadable file is the answer, whatever the filesystem raised
        return f"{redact(uri)} is unreadable ({type(exc).__name__})", set()
    if size < 8:
        return f"{redact(uri)} is truncated: {size} bytes, shorter than a safetensors header length", set()
    try:
        n = int.from_bytes(read(0, 8), "little")
        if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            return (f"{redact(uri)} is truncated or not safetensors: {size} bytes, header length {n} "
                    f"(needs 8 + {n} bytes for the header alone)"), set()
        raw = read(8, 8 + n)
    except Exception as exc:  # an unreadable file is the answer, whatever the filesystem raised
        return f"{redact(uri)} is unreadable ({type(exc).__name__})", set()
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, stop = (int(x) for x in entry["data_offsets"])
            if not 0 <= begin <= stop:
                raise ValueError(f"tensor {name!r} has data_offsets {entry['data_offsets']}")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{redact(uri)} has no valid safetensors header ({type(exc).__name__}: {str(exc)[:160]})", set()
    if size != 8 + n + end:
        how = "truncated" if size < 8 + n + end else "longer than its header says"
        return f"{redact(uri)} is {how}: {size} bytes, its header describes {8 + n + end}", set()
    return None, {k for k in header if k != "__metadata__"}


def _weight_files(root: str) -> tuple[str | None, dict[str, list[str]]]:
    """The weight files of the checkpoint at ``root`` and the tensors the index puts in each (empty lists for a
    single ``model.safetensors``), or why they cannot be listed."""
    from tasks.files import exists, read_json

    if exists(f"{root}/{_INDEX}"):
        try:
            weight_map = read_json(f"{root}/{_INDEX}")["weight_map"]
            files: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                files.setdefault(str(file), []).append(str(tensor))
        except Exception as exc:  # any unreadable index is the answer
            return f"{_INDEX} is unreadable ({type(exc).__name__}: {str(exc)[:160]})", {}
        if not files:
            return f"{_INDEX} lists no weight files", {}
        return None, files
    if exists(f"{root}/{_WEIGHTS}"):
        return None, {_WEIGHTS: []}
    return f"no weights ({redact(root)}/{_WEIGHTS} or {_INDEX})", {}


def check_version_files(source: str, checkpoint_hash: str | None) -> str | None:
    """Why the registered version whose files live at ``source`` must not become champion, or ``None`` when it
    may: its write finished (the ``_COMPLETE`` marker that :mod:`prunecomp.models.storage` writes last, locally and on
    S3), it is a loadable MLflow Model (:func:`check_mlflow_model`), every weight file is one whole safetensors
    file (:func:`safetensors_problem`, shards checked in parallel; each tensor the index names is in its shard)
    and the report beside the weights names ``checkpoint_hash``, the hash the version was registered with (the
    files are the model the version's metrics describe). Headers and small files only, never the weights."""
    from prunecomp.recipes.checkpoint import REPORT_FILE
    from tasks.files import read_json

    root = source.rstrip("/")
    if checkpoint_hash is None:
        return ("the version has no checkpoint_hash tag, so its files cannot be matched to the model it was "
                "registered for (register versions with the compress flow)")
    try:
        complete = is_complete(root)
    except Exception as exc:  # an unreachable store is the answer
        return f"its files at {redact(root)} cannot be read ({type(exc).__name__})"
    if not complete:
        return f"no {MARKER} marker in {redact(root)}: its write never finished (interrupted or still running)"
    problem = check_mlflow_model(root)
    if problem is not None:
        return problem
    problem, files = _weight_files(root)
    if problem is not None:
        return problem
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        checked = list(pool.map(lambda f: (f, *safetensors_problem(f"{root}/{f}")), sorted(files)))
    for file, problem, names in checked:
        if problem is not None:
            return f"weights {problem}"
        absent = [t for t in files[file] if t not in names]
        if absent:
            return f"weights {redact(root)}/{file} lack {len(absent)} tensor(s) its index names ({absent[0]}, ...)"
    try:
        recorded = read_json(f"{root}/{REPORT_FILE}")["pipeline"]["hash"]
    except Exception as exc:  # a missing or unreadable report is the answer
        return f"no readable {REPORT_FILE} with the checkpoint's hash ({type(exc).__name__})"
    if recorded != checkpoint_hash:
        return (f"its {REPORT_FILE} names checkpoint {str(recorded)[:12]}, but the version was registered for "
                f"{checkpoint_hash[:12]}: the files at its source are another model")
    return None
