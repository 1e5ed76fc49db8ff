"""The CLI end to end on the real small model, and every bad input it must refuse: one clear message, exit code 2,
and no output folder left behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from prunecomp.cli import main

pytestmark = pytest.mark.integration

FAST = ["--calib-source", "tinystories", "--calib-samples", "4", "--calib-seq-len", "128",
        "--eval-datasets", "tinystories", "--eval-seq-len", "128", "--eval-max-windows", "4"]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_prune_end_to_end(stories_dir, tmp_path) -> None:
    out, js = tmp_path / "out", tmp_path / "result.json"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--out", str(out),
                         "--json", str(js))
    assert code == 0, text
    assert "Perplexity" in text and "tinystories" in text and "Removed layers" in text
    report = json.loads(js.read_text())
    assert len(report["removed"]) == 2 and report["source"]["content_hash"]
    assert report["perplexity"]["tinystories"]["pruned"] > report["perplexity"]["tinystories"]["dense"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    # guarded compensation is the default: every step says what it measured and folded
    assert report["config"]["compensation"] == "guarded"
    for step in report["steps"]:
        g = step["guard"]
        assert g["decision"] in ("paper", "declined", "adjusted") and step["applied_scale"] == g["scale"]
        assert g["losses"][g["scales"].index(g["scale"])] == min(g["losses"])
    assert "guard" in text and "final check" in text
    check = report["final_check"]
    assert check["verdict"] in ("better", "same") and check["windows"] == 8 and check["folded"] in ("scales", "nothing")
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "1", *FAST, "--out", str(out))
    assert code == 2 and "already exists" in text


def test_eval_ppl(stories_dir, tmp_path) -> None:
    js = tmp_path / "ppl.json"
    code, text = _invoke("eval-ppl", "--model", str(stories_dir), "--datasets", "tinystories", "--seq-len", "128",
                         "--max-windows", "4", "--json", str(js))
    assert code == 0, text
    value = json.loads(js.read_text())["perplexity"]["tinystories"]
    assert 1.0 < value < 20.0


def _bad_arch(tmp: Path) -> Path:
    d = tmp / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"w": __import__("torch").zeros(1)}, str(d / "model.safetensors"))
    return d


def _no_weights(tmp: Path) -> Path:
    d = tmp / "empty-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _pickle_only(tmp: Path) -> Path:
    d = tmp / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return d


def _text(tmp: Path, name: str, content: str) -> str:
    p = tmp / name
    p.write_text(content)
    return str(p)


CASES = {
    "missing model path": (lambda t, s: ["--model", str(t / "nope")], "does not exist"),
    "folder without weights": (lambda t, s: ["--model", str(_no_weights(t))], "contains no weights"),
    "unsupported architecture": (lambda t, s: ["--model", str(_bad_arch(t))], "unsupported architecture"),
    "pickle without opt-in": (lambda t, s: ["--model", str(_pickle_only(t))], "--allow-pickle"),
    "layers zero": (lambda t, s: ["--model", str(s), "--layers", "0"], "greater than 0"),
    "layers too many": (lambda t, s: ["--model", str(s), "--layers", "5"], "between 1 and 4"),
    "protection leaves too few": (lambda t, s: ["--model", str(s), "--layers", "3", "--protect", "0,1,2"],
                                  "leave 2 removable"),
    "bad protect syntax": (lambda t, s: ["--model", str(s), "--protect", "a,b"], "--protect expects"),
    "empty calibration text": (lambda t, s: ["--model", str(s), "--calib-source", _text(t, "e.txt", " \n\n")],
                               "is empty"),
    "too-short calibration text": (lambda t, s: ["--model", str(s), "--calib-source", _text(t, "s.txt", "Hi.")],
                                   "too short"),
    "missing calibration file": (lambda t, s: ["--model", str(s), "--calib-source", str(t / "x.txt")],
                                 "unknown text source"),
    "missing data dir": (lambda t, s: ["--model", str(s), "--data-dir", str(t / "nodata")], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_error_and_leaves_nothing(case: str, stories_dir, tmp_path) -> None:
    build, message = CASES[case]
    args = build(tmp_path, stories_dir)
    if "--layers" not in args:
        args += ["--layers", "1"]
    out = tmp_path / "out"
    base = ["--calib-samples", "2", "--calib-seq-len", "64", "--eval-datasets", ""]
    if "--calib-source" not in args:
        base += ["--calib-source", "tinystories"]
    code, text = _invoke("prune", *args, *base, "--out", str(out))
    assert code == 2, text
    assert "error:" in text and message in " ".join(text.split()), text
    assert "Traceback" not in text
    assert not out.exists()
    assert not list(tmp_path.glob(".out*")), "no temp folder may be left behind"


def test_unwritable_output_fails_before_loading(stories_dir, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "1", *FAST, "--out", str(blocker / "o"))
    assert code == 2 and "not writable" in text
    assert "loading model" not in text


def test_help_explains_every_option() -> None:
    code, text = _invoke("prune", "--help")
    assert code == 0
    for opt in ("--model", "--layers", "--fraction", "--metric", "--mode", "--compensation", "--protect",
                "--preset", "--calib-source", "--data-dir", "--out", "--allow-pickle", "--trust-remote-code"):
        assert opt in text


def test_prune_with_refine(stories_dir, tmp_path) -> None:
    """--refine runs after the last removal: the report records it, the saved model is plain; with
    --stream-layers it is refused up front."""
    out, js = tmp_path / "out", tmp_path / "result.json"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--refine", "norms+writers",
                         "--refine-steps", "6", "--refine-lr", "0.02", "--refine-samples", "6", "--out", str(out),
                         "--json", str(js))
    assert code == 0, text
    assert "Refined (norms+writers, 6 steps, tail loss" in text
    report = json.loads(js.read_text())
    assert report["refine"]["mode"] == "norms+writers" and report["refine"]["steps"] == 6
    assert report["refine"]["loss"] == "tail" and report["config"]["refine_loss"] == "tail"
    assert report["refine"]["loss_after"] < report["refine"]["loss_before"]
    assert report["config"]["refine"] == "norms+writers" and report["config"]["refine_samples"] == 6
    decision = report["refine"]  # kept or declined on held-out windows, said in the report and the summary
    assert decision["check_windows"] > 0 and isinstance(decision["kept"], bool)
    flat = " ".join(text.split())
    assert "held-out NLL" in flat and (": kept" in flat) == decision["kept"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "1", *FAST, "--stream-layers",
                         "--refine", "norms", "--out", str(tmp_path / "streamed"))
    assert code == 2 and "--refine" in text and not (tmp_path / "streamed").exists()


def test_prune_with_progressive_refinement(stories_dir, tmp_path) -> None:
    """--refine-at each refines after every removal: the step table shows each fit, the saved recipe (v2) replays
    to the same tensors with ``apply``, and the final check undoes every fit (with lsq maps too); one-shot mode
    with it is refused up front."""
    from safetensors.torch import load_file

    out, js = tmp_path / "out", tmp_path / "result.json"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--refine", "norms+writers",
                         "--refine-at", "each", "--refine-steps", "4", "--refine-lr", "0.02", "--out", str(out),
                         "--json", str(js))
    assert code == 0, text
    assert "Refined after each removal (norms+writers, 4 steps each" in text
    assert "refining (norms+writers, 4 steps)" in text
    report = json.loads(js.read_text())
    assert report["refine"] is None and all(s["refine"]["steps"] == 4 for s in report["steps"])
    assert report["final_check"]["folded"].endswith("refine")
    assert json.loads((out / "recipe.json").read_text())["format"] == "prunecomp.recipe/v2"
    code, text = _invoke("apply", str(out), "--model", str(stories_dir), "--out", str(tmp_path / "again"))
    assert code == 0, text
    ref, got = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # with lsq: each step's map is folded before its fit; the recipe replays and the final check undoes both
    lsq, js = tmp_path / "lsq", tmp_path / "lsq.json"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--refine", "norms+writers",
                         "--refine-at", "each", "--refine-steps", "4", "--refine-lr", "0.02", "--compensation", "lsq",
                         "--out", str(lsq), "--json", str(js))
    assert code == 0, text
    report = json.loads(js.read_text())
    assert any(s["guard"].get("map_kept") for s in report["steps"]), "no map kept: the test would prove nothing"
    assert report["final_check"]["folded"] == "scales+maps+refine" and "lsq maps" in text
    code, text = _invoke("apply", str(lsq), "--model", str(stories_dir), "--out", str(tmp_path / "lsq-again"))
    assert code == 0, text
    ref, got = load_file(lsq / "model.safetensors"), load_file(tmp_path / "lsq-again" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--refine", "norms",
                         "--refine-at", "each", "--mode", "one-shot", "--out", str(tmp_path / "bad"))
    assert code == 2 and "error:" in text and "iterative" in text and "Traceback" not in text
    assert not (tmp_path / "bad").exists()


def test_prune_with_block_reconstruction(stories_dir, tmp_path) -> None:
    """--reconstruct fits the layer(s) beside each gap: each step says which layers and how much the error fell,
    the saved recipe (v3) replays to the same tensors with ``apply``, the final check compares with the source's
    weights swapped back in; ``apply --stream-layers`` replays it too; with lsq it is one clear error before any
    work."""
    from safetensors.torch import load_file

    out, js = tmp_path / "out", tmp_path / "result.json"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--reconstruct", "both",
                         "--reconstruct-steps", "6", "--refine-samples", "6", "--out", str(out), "--json", str(js))
    assert code == 0, text
    assert "reconstructed layer(s)" in text and "Reconstructed beside each gap (both, 6 steps each" in text
    report = json.loads(js.read_text())
    for s in report["steps"]:
        rec = s["reconstruct"]
        assert rec["side"] == "both" and len(rec["layers"]) == 2 and rec["windows"] == 6
        assert rec["loss_after"] < rec["loss_before"]
        assert rec["check_windows"] == 8 and rec["check_loss_before"] is not None  # kept or declined held out
    assert "held-out" in text
    assert "reconstruct" in report["final_check"]["folded"] and "reconstructed layers" in text
    assert report["final_check"]["uncompensated_ppl"] != report["final_check"]["ppl"]
    assert json.loads((out / "recipe.json").read_text())["format"] == "prunecomp.recipe/v3"
    code, text = _invoke("apply", str(out), "--model", str(stories_dir), "--out", str(tmp_path / "again"))
    assert code == 0, text
    ref, got = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    code, text = _invoke("apply", str(out), "--model", str(stories_dir), "--stream-layers", "--out",
                         str(tmp_path / "streamed"))  # a streamed replay sets the fitted layers one at a time
    assert code == 0, text
    a, b = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (out, tmp_path / "streamed"))
    ids = torch.randint(0, a.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "1", *FAST, "--reconstruct", "after",
                         "--compensation", "lsq", "--out", str(tmp_path / "bad"))
    assert code == 2 and "error:" in text and "lsq" in text and "Traceback" not in text, text
    assert not (tmp_path / "bad").exists()


def test_prune_with_sequential_refit(stories_dir, tmp_path) -> None:
    """--refit sequential refits every layer after the first gap to the dense source's streams (read layer by
    layer from the safetensors folder), before the gains: the summary says which layers and how much the error
    fell, the recipe replays bit for bit, the final check swaps the source weights back; refused with layer
    streaming and with progressive refinement, before any work."""
    from safetensors.torch import load_file

    out, js = tmp_path / "out", tmp_path / "result.json"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--refit", "sequential",
                         "--refit-steps", "4", "--refine", "norms", "--refine-steps", "2", "--out", str(out),
                         "--json", str(js))
    assert code == 0, text
    report = json.loads(js.read_text())
    refit = report["refit"]
    first = min(report["removed"])
    assert refit["layers"] == [o for o in range(5) if o > first and o not in report["removed"]], refit
    assert refit["steps"] == 4 and len(refit["loss_after"]) == len(refit["layers"])
    assert "refitting every layer after the first gap" in text, text
    assert f"Refitted layer{'s' if len(refit['layers']) > 1 else ''} {refit['layers'][0]}" in text, text
    assert report["refine"] is not None and "reconstruct" in report["final_check"]["folded"]
    code, text = _invoke("apply", str(out), "--model", str(stories_dir), "--out", str(tmp_path / "again"))
    assert code == 0, text
    ref, got = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    for extra, word in ((["--stream-layers"], "--refit"), (["--refine", "norms", "--refine-at", "each"], "refine_at")):
        code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "1", *FAST, "--refit", "sequential",
                             *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and "error:" in text and word in text and "Traceback" not in text, text
        assert not (tmp_path / "bad").exists()


def test_apply_recipe_reproduces_the_pruned_model(stories_dir, tmp_path) -> None:
    """``prune`` saves its recipe beside the weights; ``apply`` on the same source gives the same tensors, in
    memory and layer by layer; another source needs --other-source; the source folder is never an output."""
    from safetensors.torch import load_file

    out = tmp_path / "pruned"
    code, text = _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--compensation", "lsq",
                         "--out", str(out))
    assert code == 0, text
    assert (out / "recipe.json").is_file() and (out / "recipe.safetensors").is_file()
    ref = load_file(out / "model.safetensors")
    code, text = _invoke("apply", str(out / "recipe.json"), "--model", str(stories_dir), "--out", str(tmp_path / "a"))
    assert code == 0 and "removed original layers" in text, text
    got = load_file(tmp_path / "a" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    code, text = _invoke("apply", str(out), "--model", str(stories_dir), "--out", str(tmp_path / "s"),
                         "--stream-layers")
    assert code == 2 and "lsq" in text and not (tmp_path / "s").exists()

    mag = tmp_path / "mag"
    assert _invoke("prune", "--model", str(stories_dir), "--layers", "2", *FAST, "--out", str(mag), "--json",
                   str(tmp_path / "mag.json"))[0] == 0
    code, text = _invoke("apply", str(tmp_path / "mag.json"), "--model", str(stories_dir), "--out",
                         str(tmp_path / "from-report"))  # a plain JSON report of a magnitude run is enough
    assert code == 0, text
    got = load_file(tmp_path / "from-report" / "model.safetensors")
    want = load_file(mag / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    code, text = _invoke("apply", str(mag), "--model", str(stories_dir), "--out", str(tmp_path / "s"),
                         "--stream-layers")
    assert code == 0, text
    a = load_file(mag / "model.safetensors")
    b = {}
    for f in (tmp_path / "s").glob("*.safetensors"):
        b |= load_file(f)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a)

    code, text = _invoke("apply", str(mag), "--model", str(out), "--out", str(tmp_path / "o"))
    assert code == 2 and "--other-source" in text and not (tmp_path / "o").exists()
    code, text = _invoke("apply", str(mag), "--model", str(stories_dir), "--out", str(stories_dir / "x"))
    assert code == 2 and "inside the source" in text and not (stories_dir / "x").exists()
    code, text = _invoke("apply", str(tmp_path / "missing.json"), "--model", str(stories_dir), "--out",
                         str(tmp_path / "m"))
    assert code == 2 and "not found" in text


def _copy_model(src: Path, tmp: Path) -> Path:
    import shutil

    d = tmp / "model-copy"
    shutil.copytree(src, d)
    return d


def _truncated(src: Path, tmp: Path) -> Path:
    d = _copy_model(src, tmp)
    f = d / "model.safetensors"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return d


def _bad_config(src: Path, tmp: Path) -> Path:
    d = _copy_model(src, tmp)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    return d


def _nan_weight(src: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file

    d = _copy_model(src, tmp)
    state = load_file(d / "model.safetensors")
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


FAULTS = {
    "truncated safetensors": (lambda t, s: ["--model", str(_truncated(s, t))], "is truncated"),
    "malformed config.json": (lambda t, s: ["--model", str(_bad_config(s, t))], "config.json of model"),
    "calibration longer than the context": (lambda t, s: ["--model", str(s), "--calib-seq-len", "100000"],
                                            "longer than the model's context"),
    "evaluation longer than the context": (lambda t, s: ["--model", str(s), "--eval-datasets", "tinystories",
                                                         "--eval-seq-len", "4096"], "--eval-seq-len 4096"),
    "NaN in a weight": (lambda t, s: ["--model", str(_nan_weight(s, t))], "layer 2 scored nan"),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_faulty_model_or_window_gets_one_clear_error(case: str, stories_dir, tmp_path) -> None:
    """Bad input, each a probe that once gave a traceback or ran (and saved) silently."""
    build, message = FAULTS[case]
    out = tmp_path / "out"
    base = ["--layers", "1", "--calib-source", "tinystories", "--calib-samples", "2", "--calib-seq-len", "64",
            "--eval-datasets", ""]
    code, text = _invoke("prune", *base, *build(tmp_path, stories_dir), "--out", str(out))
    assert code == 2, text
    assert "error:" in text and message in " ".join(text.split()), text
    assert "Traceback" not in text and not out.exists()


def test_output_inside_the_source_is_refused_even_with_overwrite(stories_dir, tmp_path) -> None:
    import hashlib

    src = _copy_model(stories_dir, tmp_path)

    def digest() -> str:
        return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(src.rglob("*")) if f.is_file())).hexdigest()

    before = digest()
    for out in (src, src / "pruned"):
        code, text = _invoke("prune", "--model", str(src), "--layers", "1", *FAST, "--out", str(out), "--overwrite")
        assert code == 2 and ("is the source model" in text or "is inside the source model" in text), text
    assert digest() == before and not (src / "pruned").exists()


def test_held_out_windows_are_seeded_and_not_calibration_windows(stories_dir, data_dir) -> None:
    from transformers import AutoTokenizer

    from prunecomp.corpora.calibration import calibration_windows, held_out_windows

    tok = AutoTokenizer.from_pretrained(stories_dir)
    cal = calibration_windows(tok, "tinystories", n_samples=16, seq_len=64, seed=3, data_dir=data_dir)
    held = held_out_windows(tok, "tinystories", n_windows=8, seq_len=64, calibration_samples=16, seed=3,
                            data_dir=data_dir)
    assert held.n == 8 and held.digest != cal.digest and "held-out" in held.origin
    cal_rows = {tuple(r.tolist()) for r in cal.ids}
    assert not any(tuple(r.tolist()) in cal_rows for r in held.ids)
    again = held_out_windows(tok, "tinystories", n_windows=8, seq_len=64, calibration_samples=16, seed=3,
                             data_dir=data_dir)
    assert torch.equal(again.ids, held.ids)  # seeded


def test_the_final_check_and_the_gains_decision_never_see_a_fitted_window(stories_dir, data_dir) -> None:
    """A run that fits on ``refine_samples`` windows (a superset of the scoring windows) is judged on held-out
    windows that avoid all of them; the gains' keep-or-decline windows continue the same draw, so they avoid the
    final check's windows too."""
    from transformers import AutoTokenizer

    from prunecomp.config import CalibrationConfig, PruneConfig
    from prunecomp.corpora.calibration import calibration_windows, held_out_windows
    from prunecomp.engine.final_check import held_out_config

    tok = AutoTokenizer.from_pretrained(stories_dir)
    cal = CalibrationConfig(source="tinystories", n_samples=8, seq_len=64, seed=3, held_out=6)
    prune = PruneConfig(n_layers=1, refine="channels", refine_samples=48)
    held = held_out_config(cal, prune)
    assert held.n_samples == 48 and held_out_config(cal, PruneConfig(n_layers=1, refine_samples=48)) == cal
    fit = calibration_windows(tok, cal.source, n_samples=48, seq_len=64, seed=3, data_dir=data_dir)
    scoring = calibration_windows(tok, cal.source, n_samples=8, seq_len=64, seed=3, data_dir=data_dir)
    assert torch.equal(fit.ids[:8], scoring.ids)  # the fitting windows are a superset of the scoring ones
    final = held_out_windows(tok, cal.source, n_windows=6, seq_len=64, calibration_samples=held.n_samples,
                             seed=3, data_dir=data_dir)
    decide = held_out_windows(tok, cal.source, n_windows=6, seq_len=64, calibration_samples=held.n_samples,
                              seed=3, data_dir=data_dir, after=6)
    assert decide.n == 6 and "after 6" in decide.origin and decide.digest != final.digest
    both = held_out_windows(tok, cal.source, n_windows=12, seq_len=64, calibration_samples=held.n_samples, seed=3,
                            data_dir=data_dir)
    assert torch.equal(both.ids[:6], final.ids) and torch.equal(both.ids[6:], decide.ids)  # one draw, continued

    def grams(ids: torch.Tensor) -> set[tuple[int, ...]]:
        return {tuple(row[i:i + 24].tolist()) for row in ids for i in range(0, ids.shape[1] - 24)}

    assert not grams(final.ids) & grams(fit.ids) and not grams(decide.ids) & grams(fit.ids)
    assert not grams(decide.ids) & grams(final.ids)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 700 KiB filesystem (tmpfs), smaller than stories260K's weights."""
    from tests.small_disk import small_filesystem

    with small_filesystem(tmp_path / "small-disk", "700k") as mnt:
        yield mnt


def test_full_disk_is_one_error_line_and_a_rerun_completes(stories_dir, small_disk, tmp_path) -> None:
    out = small_disk / "pruned"
    args = ("prune", "--model", str(stories_dir), "--layers", "1", "--calib-source", "tinystories",
            "--calib-samples", "4", "--calib-seq-len", "128", "--eval-datasets", "")
    code, text = _invoke(*args, "--out", str(out))
    assert code == 2 and "error: no space left on the device while writing" in text, text
    assert "Traceback" not in text and list(small_disk.iterdir()) == []  # nothing half-written, no temp folder
    reference = tmp_path / "reference"
    assert _invoke(*args, "--out", str(reference))[0] == 0
    from tests.small_disk import grow

    grow(small_disk, "4m")  # space freed
    code, text = _invoke(*args, "--out", str(out))
    assert code == 0, text
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
