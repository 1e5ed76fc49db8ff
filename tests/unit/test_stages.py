"""The method's stages are parts the one loop composes: a new stage is one registered component, with no change to
the loop; what a stage needs of a backend is refused from its registry entry; the configuration is one tree of
per-stage settings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from pydantic import ValidationError

from prunecomp.config import STAGES as CONFIG_STAGES
from prunecomp.config import PruneConfig, stage_fields
from prunecomp.engine.backends import IN_MEMORY, STREAMED
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.engine.stages import STAGES, Gap, StageSpec, refusal, register, unregister
from prunecomp.models.adapters import decoder_layers
from tests.tiny_models import tiny_model, tokens

CAL = tokens(8, 16)


@dataclass
class Probe:
    """A toy stage: sees every removal before and after, checks the layer is there and then gone."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    def before(self, gap: Gap) -> None:
        self.calls.append(("before", gap.chosen, len(decoder_layers(gap.backend.model))))

    def after(self, gap: Gap) -> None:
        self.calls.append(("after", gap.chosen, len(decoder_layers(gap.backend.model))))
        gap.record["selection_losses"] = {gap.chosen: -1.0}  # a stage's own line in the audit trail


@pytest.fixture
def probe():
    seen = Probe()
    register(StageSpec("probe", wanted=lambda c: True, build=lambda c: seen, needs=frozenset({"trials"}),
                       option="--probe"))
    try:
        yield seen
    finally:
        unregister("probe")
    assert "probe" not in [s.name for s in STAGES]


def test_a_registered_stage_runs_at_every_removal_without_a_change_to_the_loop(probe: Probe) -> None:
    torch.manual_seed(0)
    source = tiny_model("llama")
    plain, probed = copy.deepcopy(source), copy.deepcopy(source)
    unregister("probe")
    want = prune_and_compensate(plain, CAL, PruneConfig(n_layers=2, compensation="magnitude"))
    register(StageSpec("probe", wanted=lambda c: True, build=lambda c: probe, needs=frozenset({"trials"})))
    got = prune_and_compensate(probed, CAL, PruneConfig(n_layers=2, compensation="magnitude"))
    n = len(decoder_layers(source))
    assert probe.calls == [("before", got.steps[0].chosen, n), ("after", got.steps[0].chosen, n - 1),
                           ("before", got.steps[1].chosen, n - 1), ("after", got.steps[1].chosen, n - 2)]
    assert [s.chosen for s in got.steps] == [s.chosen for s in want.steps]  # a no-op stage changes nothing
    assert all(s.selection_losses == {s.chosen: -1.0} for s in got.steps)
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_stage_needing_what_a_backend_lacks_is_refused_by_name(probe: Probe) -> None:
    config = PruneConfig(n_layers=2)
    why = refusal(STREAMED, config)
    assert why is not None and why.startswith("layer streaming cannot run selection by loss")
    assert refusal(IN_MEMORY, config) is None


def test_a_registered_finishing_stage_runs_once_after_the_last_removal() -> None:
    """The stages after the loop (the refit, the gains) are registry entries too: a toy one sees the pruned model
    and the report once, after the refit and the gains the configuration asks for."""
    from prunecomp.engine.compress import compress

    seen: list[tuple[int, int, bool]] = []

    @dataclass
    class Count:
        def finish(self, run) -> None:
            seen.append((len(decoder_layers(run.model)), len(run.report.steps), run.report.refine is not None))

    register(StageSpec("count", wanted=lambda c: True, build=lambda c: Count()), finishing=True)
    try:
        torch.manual_seed(0)
        source = tiny_model("llama")
        model = copy.deepcopy(source)
        compress(model, CAL, PruneConfig(n_layers=2, refine="norms", refine_steps=2), teacher=source)
    finally:
        unregister("count")
    assert seen == [(len(decoder_layers(source)) - 2, 2, True)]


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(Exception, match="already registered"):
        register(StageSpec("reconstruct", wanted=lambda c: False, build=lambda c: Probe()))


def test_the_configuration_is_one_tree_of_stage_settings() -> None:
    flat = PruneConfig(n_layers=3, reconstruct="both", reconstruct_steps=7, refine="channels", selection_pool=2)
    tree = flat.tree()
    assert tree["reconstruct"] == {"method": "both", "steps": 7, "lr": 1e-3, "batch": 4}
    assert tree["selection"] == {"method": "score", "pool": 2}
    assert tree["removal"]["n_layers"] == 3
    assert PruneConfig.model_validate(tree) == flat  # the tree is a config file's prune section
    settings = flat.stage("reconstruct")
    assert (settings.method, settings.steps) == ("both", 7)
    with pytest.raises(ValidationError):
        settings.steps = 3  # frozen
    every = {name for stage in CONFIG_STAGES for name in stage_fields(stage).values()}
    assert every == set(PruneConfig.model_fields)  # every field lives in exactly one stage


@pytest.mark.parametrize(("data", "needle"), [
    ({"reconstruct": {"sides": "both"}}, "reconstruct: unknown setting(s) sides"),
    ({"reconstruct": {"method": "both"}, "reconstruct_steps": 3, "refine": {"steps": 2}, "refine_steps": 4},
     "refine_steps is given twice"),
    ({"removal": {"n_layers": 2}, "bogus": 1}, "bogus"),
])
def test_a_wrong_tree_is_a_clear_error(data, needle) -> None:
    with pytest.raises(ValidationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        PruneConfig.model_validate(data)
