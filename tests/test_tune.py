"""mambamerge.tune (issue 19): label-free KL scoring, an exact-budget schedule search, a config that
round-trips through JSON into patch(config=), seeded and resumable."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import mambamerge
from mambamerge.merge.schedule import Schedule
from mambamerge.tune import kl_to_dense, reference_logits


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_nano", img_size=32, depth=6, num_classes=10).eval()
    return model, torch.randn(16, *model.input_shape)


def tuned(model, inputs, **kw):
    return mambamerge.tune(model, inputs, 0.6, methods=["mame", "stm"], max_candidates=24, screen=6, **kw)


def test_kl_equals_a_hand_computation():
    dense, other = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p, q = F.softmax(dense, -1), F.softmax(other, -1)
    hand = sum(p[0, i] * torch.log(p[0, i] / q[0, i]) for i in range(3))
    assert kl_to_dense(dense, other).item() == pytest.approx(hand.item(), rel=1e-6)
    assert kl_to_dense(dense, dense).item() == pytest.approx(0.0, abs=1e-12)


def test_tune_scores_against_the_dense_model_and_leaves_it_dense(model_and_inputs):
    model, x = model_and_inputs
    result = tuned(model, x)
    assert model.token_reducer is None
    chosen = result.config
    exact = [c for c in result.candidates if c["stage"] in ("refit", "spacing", "schedule")]  # at the budget exactly
    assert chosen["score"]["kl"] == min(c["kl"] for c in exact)
    # the recorded KL is that of the patched model on the inputs, recomputed here independently
    with torch.no_grad():
        dense = model(x)
        patched = mambamerge.patch(model, config=chosen)(x)
    mambamerge.unpatch(model)
    assert kl_to_dense(dense, patched).mean().item() == pytest.approx(chosen["score"]["kl"], rel=1e-5)


def test_reference_logits_are_the_dense_model_s_and_compiled_run_one_graph(model_and_inputs, captured_graphs):
    """A patched model's reference is its dense prediction (the model is left patched); compiled, the short
    last batch is padded, so that every batch runs the one graph, with the same logits."""
    model, x = model_and_inputs
    graphs = captured_graphs
    with torch.no_grad():
        dense = model(x)
    mambamerge.patch(model, "mame", reduction=0.5)
    try:
        eager = reference_logits(model, x, batch_size=5)  # batches of 5, 5, 5 and 1
        compiled = reference_logits(model, x, batch_size=5, compile=True)
        assert model.token_reducer is not None
    finally:
        mambamerge.unpatch(model)
    assert eager.compile_s is None and set(compiled.compile_s) == {"dense"} and compiled.seconds > 0
    assert len(graphs) == 1
    torch.testing.assert_close(eager.logits, dense)
    torch.testing.assert_close(compiled.logits, dense)


def test_given_dense_logits_are_what_candidates_are_scored_against(model_and_inputs):
    model, x = model_and_inputs
    reference = reference_logits(model, x).logits
    computed = tuned(model, x)
    assert tuned(model, x, dense_logits=reference).config == computed.config
    other = tuned(model, x, dense_logits=2 * reference)  # sharper targets: every KL changes
    assert [c["kl"] for c in other.candidates[:3]] != pytest.approx([c["kl"] for c in computed.candidates[:3]])
    with pytest.raises(ValueError, match="dense_logits must be"):
        tuned(model, x, dense_logits=reference[:3])


def test_schedule_search_keeps_the_reduction_exact(model_and_inputs):
    model, x = model_and_inputs
    result = tuned(model, x)
    kept = round(0.4 * 6 * 65)  # tokens summed over the 6 blocks at 60% of 65 tokens
    spaced = [c for c in result.candidates if c["stage"] == "spacing"]
    moved = [c for c in result.candidates if c["stage"] == "schedule"]
    refit = [c for c in result.candidates if c["stage"] == "refit"]
    assert moved, "the schedule search ran no candidate"
    assert len({(c["start"], c["every"]) for c in spaced}) >= 3 and any(c["start"] > 1 for c in spaced)
    assert len({tuple(c["removals"]) for c in refit + spaced + moved}) == len(refit + spaced + moved)
    # the refined best's own schedule, changed by the fewest tokens to meet the budget
    best = min((c for c in result.candidates if c["stage"] == "refine"), key=lambda c: c["kl"])
    assert len(refit) == 1 and refit[0]["method"] == best["method"] and refit[0]["options"] == best["options"]
    assert sum(abs(a - b) for a, b in zip(refit[0]["removals"], best["removals"])) <= 2
    for c in refit + spaced + moved:
        assert sum(Schedule(tuple(c["removals"])).token_counts(65)) == kept
        assert c["reduction"] == pytest.approx(1 - kept / (6 * 65), abs=1e-12)
    for c in spaced:  # steps only where the spacing puts them
        assert all(r == 0 for b, r in enumerate(c["removals"]) if b < c["start"] or (b - c["start"]) % c["every"])
    assert result.config["reduction"] == pytest.approx(1 - kept / (6 * 65), abs=1e-12)
    assert result.config["budget"] == {"reduction": 0.6}


def test_fits_meet_a_token_sum_exactly_with_the_fewest_changes_first():
    from mambamerge.budget import fits, kept_sum

    def fit(*args, **kw):
        return next(fits(*args, **kw), None)

    base = [0, 30, 0, 12, 0, 5]  # steps before blocks 1, 3, 5 of 6: one token there is 5, 3 or 1 token-layers
    for kept in range(kept_sum(base, 65) - 12, kept_sum(base, 65) + 12):
        out = fit(base, kept, 65)
        assert kept_sum(out, 65) == kept and [b for b, r in enumerate(out) if r] == [1, 3, 5]
        assert sum(abs(a - b) for a, b in zip(out, base)) <= 4
    even = [0, 0, 30, 0, 12, 0]  # steps 4 and 2 blocks from the end: only even changes
    assert fit(even, kept_sum(even, 65) - 1, 65) is None
    assert kept_sum(fit(even, kept_sum(even, 65) - 2, 65), 65) == kept_sum(even, 65) - 2
    for gap in (-3, -1, 1, 3):  # at any block the odd gaps close too: every fit of the fewest changes, then one more
        found = list(fits(even, kept_sum(even, 65) - gap, 65, blocks=range(1, 6)))
        changed = [sum(abs(a - b) for a, b in zip(out, even)) for out in found]
        assert found and all(kept_sum(out, 65) == kept_sum(even, 65) - gap and min(out) >= 0 for out in found)
        assert changed == sorted(changed) and set(changed) == {changed[0], changed[0] + 1}
        assert len({tuple(out) for out in found}) == len(found)
    # a token leaving before block 3 instead of 4 removes one token-layer more: a fit of two changes
    assert [0, 0, 30, 1, 11, 0] in list(fits(even, kept_sum(even, 65) - 1, 65, blocks=range(1, 6)))
    lone = [0, 0, 0, 1, 0, 0]  # giving back 6 token-layers would take block 3's one token twice
    assert fit(lone, kept_sum(lone, 65) + 6, 65, blocks=[3]) is None


def test_the_refit_takes_the_first_fit_the_method_accepts(model_and_inputs, monkeypatch):
    """The fewest-change fit of the refined best's schedule may exceed the method's capacity at a block;
    the refit then takes the next fit, not nothing."""
    tune_module = sys.modules["mambamerge.tune"]  # the package binds the name `tune` to the function
    model, x = model_and_inputs
    real, refused = tune_module._valid, []

    def first_refused(work, method, options, removals):
        if not refused:
            refused.append(list(removals))
            return False
        return real(work, method, options, removals)

    monkeypatch.setattr(tune_module, "_valid", first_refused)
    refit = [c for c in tuned(model, x).candidates if c["stage"] == "refit"]
    assert len(refit) == 1 and refit[0]["removals"] != refused[0]
    assert sum(Schedule(tuple(refit[0]["removals"])).token_counts(65)) == round(0.4 * 6 * 65)


def test_a_gmacs_budget_is_met_within_one_token_step_and_never_exceeded(model_and_inputs):
    from mambamerge.budget import token_macs

    model, x = model_and_inputs
    dense = mambamerge.flops(model).total_one_direction / 1e9
    step = token_macs(model) / 1e9
    for budget in (0.45 * dense, 0.6 * dense):
        result = mambamerge.tune(model, x, gmacs=budget, methods=["mame", "stm"], max_candidates=20, screen=6)
        config = result.config
        assert budget - step < config["gmacs"] <= budget and config["budget"] == {"gmacs": budget}
        with torch.no_grad():  # the GMACs recorded are the patched model's, counted afresh
            reached = mambamerge.flops(mambamerge.patch(model, config=config)).total_one_direction / 1e9
        mambamerge.unpatch(model)
        assert reached == pytest.approx(config["gmacs"], rel=1e-12)
        for c in result.candidates:
            if c["stage"] in ("refit", "spacing", "schedule"):
                assert budget - step < c["gmacs"] <= budget


def test_bad_budgets_are_refused_by_name(model_and_inputs):
    model, x = model_and_inputs
    dense = mambamerge.flops(model).total_one_direction / 1e9
    for kw, message in [(dict(), "exactly one budget"), (dict(reduction=0.5, gmacs=0.001), "exactly one budget"),
                        (dict(gmacs=dense), "not below the dense model's"),
                        (dict(gmacs=2 * dense), "not below the dense model's"),
                        (dict(gmacs=0.05 * dense), "below the cheapest this model reaches"),
                        (dict(gmacs="0.1"), "must be a number")]:
        with pytest.raises(ValueError, match=message):
            mambamerge.tune(model, x, methods=["mame"], **kw)


def test_config_round_trips_through_json_with_identical_logits(model_and_inputs):
    model, x = model_and_inputs
    config = tuned(model, x).config
    back = json.loads(json.dumps(config))
    with torch.no_grad():
        a = mambamerge.patch(model, config=config)(x)
        b = mambamerge.patch(model, config=back)(x)
    mambamerge.unpatch(model)
    assert torch.equal(a, b)
    assert mambamerge.reduction_summary(mambamerge.patch(model, config=back))["removals"] == config["removals"]
    mambamerge.unpatch(model)


def test_config_refused_on_a_model_of_another_depth(model_and_inputs):
    model, x = model_and_inputs
    config = tuned(model, x).config
    other = mambamerge.create_model("vim_nano", img_size=32, depth=4, num_classes=10)
    with pytest.raises(ValueError, match="6 blocks and 65 tokens, but this model has 4 blocks"):
        mambamerge.patch(other, config=config)


def test_tune_is_seeded_and_repeatable(model_and_inputs):
    model, x = model_and_inputs
    a, b = tuned(model, x, seed=3), tuned(model, x, seed=3)
    assert a.config == b.config
    assert [(c["method"], c["options"], c["removals"], c["kl"]) for c in a.candidates] == [
        (c["method"], c["options"], c["removals"], c["kl"]) for c in b.candidates]


def test_a_killed_tune_resumes_from_its_journal(model_and_inputs, tmp_path, monkeypatch):
    model, x = model_and_inputs
    journal = tmp_path / "journal.json"
    full = tuned(model, x)
    tune_module = sys.modules["mambamerge.tune"]  # the package binds the name `tune` to the function
    calls = []
    real = tune_module._logits

    def dies_after_five(*args):
        calls.append(1)
        if len(calls) > 6:  # the dense logits, then five candidates
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tune_module, "_logits", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        tuned(model, x, journal=journal)
    assert len(json.loads(journal.read_text())) == 5
    calls.clear()
    monkeypatch.setattr(tune_module, "_logits", lambda *args: (calls.append(1), real(*args))[1])
    resumed = tuned(model, x, journal=journal)
    assert resumed.config == full.config
    assert len(calls) == 1 + len(full.candidates) - 5  # the journaled five are not run again


def test_labels_rank_by_top1_first(model_and_inputs):
    model, x = model_and_inputs
    with torch.no_grad():
        labels = model(x).argmax(-1)
    result = tuned(model, x, labels=labels)
    full = [c for c in result.candidates if c["inputs"] == len(x)]
    assert result.config["score"]["top1"] == max(c["top1"] for c in full)


def test_clips_get_the_frame_scopes_in_the_search_and_images_do_not(model_and_inputs):
    from test_families import small_videomamba

    from mambamerge.merge import METHODS

    image, _ = model_and_inputs
    video = small_videomamba(seed=1, depth=4, num_frames=8)
    for name, scopes in (("mame", ["free", "frame", "tube"]), ("stm", ["free", "frame"]), ("tome", ["free", "frame"])):
        assert METHODS[name].search_space(video.layout)["scope"] == scopes
        assert "scope" not in METHODS[name].search_space(image.layout)
    clips = torch.randn(8, *video.input_shape)
    result = mambamerge.tune(video, clips, 0.4, methods=["tome"], max_candidates=8, screen=4)
    tried = {c["options"].get("scope", "free") for c in result.candidates}
    assert tried == {"free", "frame"}
