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
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["INPUT_EXAMPLE", "check_mlflow_model", "requirements", "write_mlflow_model"]

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
    return f"missing {', '.join(missing)}" if missing else None
