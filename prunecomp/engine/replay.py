"""Apply a saved recipe to a source model and write the result: ``prunecomp apply`` and the pipeline's final
write both come here, in memory or layer by layer.

A recipe records the content hash of the model it was made on. Applying it to that model reproduces the run's
tensors exactly; applying it to another checkpoint of the same architecture and depth (a newer fine-tune, last
night's recipe on today's weights) is allowed only when asked for, and the output's recipe then names the model
it was really applied to.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prunecomp.engine.loop import replay
from prunecomp.errors import PrunecompError
from prunecomp.models.outputs import check_output
from prunecomp.models.sources import content_hash, load_model, resolve_source
from prunecomp.recipes.checkpoint import save_pruned
from prunecomp.recipes.recipe import RECIPE_FILE, Recipe, read_recipe, recipe_from_report

__all__ = ["apply_to_source"]


def _recipe_or_report(path: str) -> Recipe:
    """A recipe file (or folder), or a JSON report of a run without folded tensors (see ``recipe_from_report``)."""
    if path.endswith(".json") and not path.endswith(RECIPE_FILE) and Path(path).is_file():
        import json

        try:
            doc = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrunecompError(f"{path!r} is not valid JSON: {exc}") from exc
        if isinstance(doc, dict) and "format" not in doc:
            return recipe_from_report(doc)
    return read_recipe(path)


def apply_to_source(recipe_path: str, model: str | None, out: str, *, revision: str | None = None,
                    stream_layers: bool = False, other_source: bool = False, overwrite: bool = False,
                    allow_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Read ``recipe_path``, apply it to ``model`` and save the result (with its recipe) to ``out``."""
    t0 = time.perf_counter()
    recipe = _recipe_or_report(recipe_path)
    check_output(out, sources=[model], inputs=[recipe_path], overwrite=overwrite)
    source = resolve_source(model, revision, allow_pickle=allow_pickle)
    check_output(out, sources=[source.local_dir], inputs=[recipe_path], overwrite=overwrite)
    digest = content_hash(source)
    same = digest == recipe.source.get("content_hash")
    if not same and not other_source:
        raise PrunecompError(
            f"recipe was made on a model with content hash {str(recipe.source.get('content_hash'))[:12]}, this "
            f"model's is {digest[:12]}: pass --other-source to apply it to another checkpoint of the same family")
    applied_to = {**recipe.source, "content_hash": digest, "uri": source.uri}
    out_recipe = recipe if same else replace(recipe, source=applied_to)
    report = {"applied_recipe": {"recipe": str(recipe_path), "digest": recipe.digest(), "same_source": same,
                                 "source": applied_to}, "removed": recipe.removed}
    if stream_layers:
        from transformers import AutoTokenizer

        from prunecomp.engine.streamed import StreamedModel

        if source.gguf_file is not None:
            raise PrunecompError("--stream-layers reads safetensors folders; this model is a GGUF file")
        sm = StreamedModel(source.local_dir)
        replay(sm, recipe)
        sm.save(out, tokenizer=AutoTokenizer.from_pretrained(source.local_dir), report=report, recipe=out_recipe,
                overwrite=overwrite)
    else:
        lm = load_model(model, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        replay(lm.model, recipe)
        save_pruned(lm.model, lm.tokenizer, out, report=report, recipe=out_recipe, overwrite=overwrite)
    return report | {"out": out, "seconds": time.perf_counter() - t0, "recipe_digest": recipe.digest()}
