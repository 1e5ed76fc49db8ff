"""Checks shared by the tests of whole-layer fits (block reconstruction, the sequential refit): the recipe written
and read back replays bit for bit, and the final check's view of the fitted model is the plain removal."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from prunecomp.engine.final_check import reconstructed_layers, uncompensated_view
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import remove_layer
from prunecomp.recipes.apply import apply_recipe
from prunecomp.recipes.recipe import Recipe, read_recipe, write_recipe_files


def replays_and_views(source: nn.Module, model: nn.Module, recipe: Recipe, ids: Tensor, folder: Path
                      ) -> dict[int, dict[str, Tensor]]:
    """Assert that ``recipe`` (written to ``folder`` and read back) replays on ``source`` to ``model``'s tensors
    bit for bit, and that inside :func:`uncompensated_view` (the source's weights swapped into the rewritten
    layers) ``model`` computes the plain removal of the same layers, its weights restored after. Returns the
    source weights of the rewritten layers by final index (the view's ``originals``)."""
    write_recipe_files(recipe, folder)
    again = read_recipe(folder)
    assert again.digest() == recipe.digest()
    replayed = apply_recipe(copy.deepcopy(source), again)
    for (n, a), b in zip(model.state_dict().items(), replayed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    plain = copy.deepcopy(source)
    for s in recipe.steps:
        remove_layer(plain, s.current)
    rewritten = reconstructed_layers(recipe, len(decoder_layers(model)))
    originals = {j: {n: p.detach().clone() for n, p in decoder_layers(source)[o].named_parameters()}
                 for j, o in rewritten.items()}
    with torch.no_grad():
        final = model(input_ids=ids).logits
        with uncompensated_view(model, recipe, originals):
            viewed = model(input_ids=ids).logits
        torch.testing.assert_close(viewed, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(input_ids=ids).logits, final)  # weights restored after the view
    return originals
