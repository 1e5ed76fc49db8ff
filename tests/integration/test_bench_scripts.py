"""The GPU smoke script runs (on CPU, tiny model): it is what a lent GPU machine executes, so it must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_gpu_smoke_script_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu", "--small",
                           "--samples", "8", "--seq-len", "64", "--refine-steps", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and {r["check"] for r in result["rows"]} >= {
        "in-memory lsq", "in-memory refine", "in-memory magnitude", "streamed magnitude"}
    assert "bit-identical: True" in next(r["detail"] for r in result["rows"] if r["check"] == "in-memory lsq")


def test_results_doc_is_generated_from_the_result_files() -> None:
    """docs/RESULTS.md is what bench/results_doc.py builds from bench/results/: no hand-typed number drifts."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "results_doc.py"), "--check"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_anchor_baselines_on_a_tiny_model() -> None:
    """ReplaceMe removes a k-block and its least-squares map lowers the gap error; LinearPatch's patch is
    H diag(d) H^T with an orthonormal Hadamard H and is part of the model's state (so the eval cache sees it)."""
    import copy

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from anchors import hadamard, linear_patch, replace_me

    from tests.tiny_models import tiny_model, tokens

    for n in (12, 32, 576):
        h = hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-10)
    model, ids = tiny_model("llama"), tokens(4, 12)
    a = copy.deepcopy(model)
    info = replace_me(a, ids, 2, batch_size=2)
    assert len(a.model.layers) == 4 and len(info["removed"]) == 2
    assert info["fit_error_after"] < info["fit_error_before"]
    b = copy.deepcopy(model)
    linear_patch(b, ids, 2, batch_size=2)
    patch = [v for k, v in b.state_dict().items() if "linear_patch" in k]
    assert len(b.model.layers) == 4 and len(patch) == 1 and patch[0].shape == (32, 32)
    assert torch.allclose(patch[0], patch[0].T, atol=1e-5)  # H diag(d) H^T is symmetric


def test_ghosted_layers_put_a_least_squares_map_at_every_cut() -> None:
    """Ghosted Layers: k iterative removals, each replaced by a float64 least-squares map of the stream that
    lowers the stream error at its cut; the maps are in the model's state (run-time modules) and, applied, they
    take the model closer to the dense one than removing the same layers plainly."""
    import copy

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from anchors import ghosted_layers

    from prunecomp.models.pruning import remove_layer
    from tests.tiny_models import tiny_model, tokens

    model, ids = tiny_model("llama"), tokens(4, 12)
    ghosted = copy.deepcopy(model)
    info = ghosted_layers(ghosted, ids, 2, batch_size=2)
    assert len(ghosted.model.layers) == 4 and len(set(info["removed"])) == 2 and 0 not in info["removed"]
    assert all(e["after"] < e["before"] for e in info["fit_errors"])
    maps = [v for k, v in ghosted.state_dict().items() if ".ghosts.maps." in k]
    assert len(maps) == 2 and all(m.shape == (32, 32) for m in maps)
    plain = copy.deepcopy(model)
    for i in sorted(info["removed"], reverse=True):
        remove_layer(plain, i)
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
        gap = [float((m(input_ids=ids).logits - dense_logits).pow(2).mean()) for m in (ghosted, plain)]
    assert gap[0] < gap[1], gap
