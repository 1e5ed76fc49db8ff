"""``prunecomp prune --stream-layers`` on the real small model: same decisions, perplexities and saved weights as
the in-memory job, and the same early errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from prunecomp.cli import main

pytestmark = pytest.mark.integration

FAST = ["--calib-source", "tinystories", "--calib-samples", "4", "--calib-seq-len", "128",
        "--eval-datasets", "tinystories", "--eval-seq-len", "128", "--eval-max-windows", "4", "--layers", "2"]


def _prune(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["prune", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_streamed_job_equals_in_memory_job(stories_dir, tmp_path) -> None:
    runs = {}
    for name, extra in (("memory", []), ("streamed", ["--stream-layers"])):
        code, text = _prune("--model", str(stories_dir), *FAST, *extra, "--out", str(tmp_path / name),
                            "--json", str(tmp_path / f"{name}.json"))
        assert code == 0, text
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    mem, st = runs["memory"], runs["streamed"]
    assert st["removed"] == mem["removed"] and st["scoring"] == "streamed"
    assert st["source"]["content_hash"] == mem["source"]["content_hash"]
    for kind in ("dense", "pruned"):
        assert st["perplexity"]["tinystories"][kind] == pytest.approx(mem["perplexity"]["tinystories"][kind],
                                                                      rel=1e-4)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_streamed_block_reconstruction_equals_in_memory(stories_dir, tmp_path) -> None:
    """``--stream-layers --reconstruct both``: the fits of the in-memory job, one layer pair in memory; the same
    decisions, fits, final check and (up to float rounding) weights; the recipe (v3) replays in memory."""
    runs = {}
    fit = ["--reconstruct", "both", "--reconstruct-steps", "4", "--refine-samples", "6"]
    for name, extra in (("memory", []), ("streamed", ["--stream-layers"])):
        code, text = _prune("--model", str(stories_dir), *FAST, *fit, *extra, "--out", str(tmp_path / name),
                            "--json", str(tmp_path / f"{name}.json"))
        assert code == 0, text
        assert "reconstructed layer(s)" in text
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    mem, st = runs["memory"], runs["streamed"]
    assert st["removed"] == mem["removed"] and st["scoring"] == "streamed"
    for a, b in zip(mem["steps"], st["steps"], strict=True):
        assert b["reconstruct"]["layers"] == a["reconstruct"]["layers"] and b["reconstruct"]["windows"] == 6
        assert b["reconstruct"]["loss_after"] == pytest.approx(a["reconstruct"]["loss_after"], rel=1e-3)
    check_m, check_s = mem["final_check"], st["final_check"]
    assert check_s["folded"] == check_m["folded"] and "reconstruct" in check_s["folded"]
    for key in ("ppl", "uncompensated_ppl"):
        assert check_s[key] == pytest.approx(check_m[key], rel=1e-3)
    assert st["perplexity"]["tinystories"]["pruned"] == pytest.approx(mem["perplexity"]["tinystories"]["pruned"],
                                                                      rel=1e-3)
    assert json.loads((tmp_path / "streamed" / "recipe.json").read_text())["format"] == "prunecomp.recipe/v3"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    result = CliRunner().invoke(main, ["apply", str(tmp_path / "streamed"), "--model", str(stories_dir),
                                       "--out", str(tmp_path / "again")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(c(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "taylor"], "layer streaming cannot run metric 'taylor'"),
    (["--compensation", "lsq"], "layer streaming cannot run the lsq gap map"),
    (["--quality", "balanced"], "layer streaming cannot run the gains"),
])
def test_streamed_job_rejects_what_it_cannot_do(stories_dir, tmp_path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    code, text = _prune("--model", str(stories_dir), *FAST, "--stream-layers", *args, "--out", str(out))
    assert code == 2 and message in text
    assert not out.exists()
