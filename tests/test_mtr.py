"""MTR and MaMe's choosers of sources and destinations, checked on hand-made token sequences."""
from typing import Literal, get_origin, get_type_hints

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mambamerge.merge import METHODS, MTR, MaMe
from mambamerge.merge.matching import (least_per_group, most_similar, near_class_token, spread_sources, top_band,
                                       uniform_sources)
from mambamerge.merge.state import TokenState
from mambamerge.merge.stm import injection_strength
from test_mame_stm import as_read, make_ssm, make_state


def leaving(plan, length):
    return sorted(set(range(length)) - set(plan.rep[0].tolist()))


def members(new, slot):
    return new.source[0, slot].nonzero().flatten().tolist()


def with_residual(state, residual):
    return TokenState(state.hidden, residual, state.size, state.pos, state.cls_index, state.source)


# ---- MTR ---------------------------------------------------------------------------------------

def test_mtr_merges_each_source_into_its_most_similar_target_never_into_the_keep_band():
    state = make_state(length=11, cls=5)
    feat = state.residual.clone()
    feat[0, 0] = 2 * feat[0, 10]  # token 0's twin is token 10, in the keep band
    feat[0, 1] = 2 * feat[0, 7] + 0.05 * feat[0, 10]  # token 1's twin is token 7, a target
    state = with_residual(state, feat)
    delta = torch.tensor([[0.1, 0.2, 1.0, 1.1, 1.2, 0.01, 1.3, 1.4, 2.0, 2.1, 2.2]], dtype=torch.float64)
    # non-class tokens: 10; keep 0.3 -> the 3 highest (8, 9, 10) are kept; r = 2 sources (0, 1)
    plan = MTR(keep_top=0.3).plan(state, make_ssm(delta), 2)
    assert leaving(plan, 11) == [0, 1]
    new = state.apply(plan)
    for kept in (8, 9, 10):  # untouched: one member each
        slot = int((new.pos[0] == kept).nonzero())
        assert members(new, slot) == [kept]
    holder_of_1 = int(new.source[0, :, 1].argmax())
    assert new.pos[0, holder_of_1] == 7
    holder_of_0 = int(new.source[0, :, 0].argmax())
    assert int(new.pos[0, holder_of_0]) in (2, 3, 4, 6, 7)  # a target, not its twin 10
    sim = torch.nn.functional.cosine_similarity(feat[0, 0][None], feat[0, [2, 3, 4, 6, 7]])
    assert new.pos[0, holder_of_0] == [2, 3, 4, 6, 7][int(sim.argmax())]
    # plain average of the members, order kept, class token tracked
    tokens = (state.residual + state.hidden)[0]
    for slot in {holder_of_0, holder_of_1}:
        torch.testing.assert_close(new.hidden[0, slot], tokens[members(new, slot)].mean(dim=0))
    assert (new.pos.diff(dim=1) > 0).all() and new.cls_index.item() == 3


def test_mtr_size_weight_and_importance_is_delta_summed_over_directions():
    state = make_state(length=9, cls=4)
    state = TokenState(state.hidden, state.residual, torch.arange(1.0, 10.0, dtype=torch.float64)[None],
                       state.pos, state.cls_index, state.source)
    fwd = torch.tensor([[1.5, 0.1, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    bwd = torch.tensor([[0.0, 0.3, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.2]], dtype=torch.float64)
    ssm = make_ssm(fwd)._replace(delta_bwd=make_ssm(bwd).delta_bwd)
    plan = MTR(keep_top=0.0, weight="size").plan(state, ssm, 2)
    assert leaving(plan, 9) == [1, 8]  # sums 0.4 and 1.2 are the lowest; token 0, lowest backward, stays
    new = state.apply(plan)
    tokens = (state.residual + state.hidden)[0]
    for source in (1, 8):
        slot = int(new.source[0, :, source].argmax())
        group = members(new, slot)
        size = state.size[0, group]
        torch.testing.assert_close(new.hidden[0, slot], (size[:, None] * tokens[group]).sum(0) / size.sum())


def test_mtr_keep_band_shrinks_to_leave_a_target():
    state = make_state(length=11, cls=5)
    delta = torch.linspace(0.1, 1.0, 11, dtype=torch.float64)[None]
    plan = MTR(keep_top=0.9).plan(state, make_ssm(delta), 8)  # 10 non-class tokens: 8 sources, 1 kept, 1 target
    new = state.apply(plan)
    sizes = sorted(new.size[0].tolist())
    assert new.length == 3 and sizes == [1.0, 1.0, 9.0]
    assert members(new, int((new.pos[0] == 10).nonzero())) == [10]  # the most important is kept alone


@pytest.mark.parametrize("options,message", [({"keep_top": 1.0}, "keep_top must be in"), ({"weight": "delta"}, "weight must be"),
                                             ({"feature": "x"}, "feature must be")])
def test_mtr_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        MTR(**options)


def test_mtr_needs_the_step_sizes():
    with pytest.raises(ValueError, match="mtr needs the SSM step sizes"):
        MTR().plan(make_state(), None, 1)


# ---- MaMe's sources -----------------------------------------------------------------------------

def test_least_per_group_cuts_eligible_tokens_into_equal_runs():
    score = torch.tensor([[5.0, 1.0, 3.0, 0.0, 2.0, 2.0, 9.0, 4.0, 4.0]])
    eligible = torch.tensor([[True, True, True, False, True, True, True, True, True]])
    # eligible: 0 1 2 4 5 6 7 8 -> runs of 8 * g // 8 ... with 3 runs: ranks 0-2, 3-5, 6-7
    got = least_per_group(score, eligible, torch.tensor([3]))
    assert got.tolist() == [[1, 4, 7]]  # ties (2.0 at 4, 5; 4.0 at 7, 8): lowest index
    two_images = least_per_group(score.expand(2, -1), torch.stack([eligible[0], torch.ones(9, dtype=torch.bool)]),
                                 torch.tensor([3, 2]))
    assert two_images.tolist() == [[1, 4, 7], [3, 5, -1]]  # 9 tokens in 2 runs: 0-4, 5-8


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_uniform_sources_in_closed_form_are_spread_sources_of_equal_scores(data):
    length = data.draw(st.integers(1, 70), label="length")
    batch = data.draw(st.integers(0, 4), label="batch")
    cls = None
    if data.draw(st.booleans(), label="class token"):  # each image its own class-token index
        cls = torch.tensor(data.draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch)),
                           dtype=torch.long)
    width = 0 if cls is None else data.draw(st.integers(0, length // 2), label="width")
    eligible = torch.ones(batch, length, dtype=torch.bool) if cls is None else ~near_class_token(cls, length, width)
    most = int(eligible.sum(dim=1).min()) if batch else length
    assume(most >= 1)
    r = data.draw(st.integers(1, most), label="r")
    expected = spread_sources(torch.zeros(batch, length), eligible, r)
    assert torch.equal(uniform_sources(cls, batch, length, width, r, torch.device("cpu")), expected)


def test_mame_spread_sources_take_the_least_important_of_each_run():
    state = make_state(length=11, cls=5)
    delta = torch.tensor([[0.2, 0.1, 0.3, 0.4, 0.5, 0.0, 0.9, 0.8, 0.7, 0.95, 0.6]], dtype=torch.float64)
    # overall the two least important are 1 and 0 (same half); spread takes one from each half
    assert leaving(as_read(sources="least_delta").plan(state, make_ssm(delta), 2), 11) == [0, 1]
    assert leaving(as_read(sources="spread").plan(state, make_ssm(delta), 2), 11) == [1, 10]
    assert leaving(as_read(sources="uniform").plan(state, make_ssm(delta), 2), 11) == [0, 6]  # first of each run


def test_mame_pair_sources_never_take_both_tokens_of_a_pair():
    state = make_state(length=11, cls=5)
    delta = torch.tensor([[0.1, 0.2, 0.9, 0.3, 0.8, 0.0, 0.7, 0.15, 0.25, 0.6, 0.5]], dtype=torch.float64)
    # pairs (0,1) (2,3) (4,6) (7,8) (9,10): candidates 0 .1, 3 .3, 6 .7, 7 .15, 10 .5
    plan = as_read(sources="pairs").plan(state, make_ssm(delta), 3)
    assert leaving(plan, 11) == [0, 3, 7]
    assert as_read(sources="pairs").capacity(11, state.layout) == 5


def test_mame_protected_window_neither_gives_nor_takes_and_narrows_when_it_must():
    state = make_state(length=15, cls=7, seed=4)
    delta = torch.linspace(1.0, 2.0, 15, dtype=torch.float64)[None].clone()
    delta[0, 6:9] = 0.01  # the class token's neighbours are the least important
    method = as_read(w_protect=2)
    new = state.apply(method.plan(state, make_ssm(delta), 4))
    for original in range(5, 10):
        slot = int(new.source[0, :, original].argmax())
        assert members(new, slot) == [original]  # untouched: not merged away, nothing merged in
    assert method.protected_width(15, 4) == 2
    assert method.protected_width(15, 10) == 1 and method.protected_width(15, 12) == 0  # 14 - 2w >= r + 1


def test_mame_keep_top_and_cap_limit_the_destinations():
    state = make_state(length=11, cls=5, seed=2)
    feat = state.residual.clone()
    feat[0, 0] = feat[0, 10] * 3  # sources 0, 1, 2 all point at token 10 (the most important)
    feat[0, 1] = feat[0, 10] * 2 + 0.1 * feat[0, 8]
    feat[0, 2] = feat[0, 10] * 2 + 0.2 * feat[0, 8]
    state = with_residual(state, feat)
    delta = torch.tensor([[0.1, 0.2, 0.3, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 5.0]], dtype=torch.float64)
    ssm = make_ssm(delta)
    free = state.apply(as_read().plan(state, ssm, 3))
    assert sorted(members(free, int((free.pos[0] == 10).nonzero()))) == [0, 1, 2, 10]
    banded = state.apply(as_read(keep_top=0.1).plan(state, ssm, 3))  # 10 non-class tokens: token 10 keeps out
    assert members(banded, int((banded.pos[0] == 10).nonzero())) == [10]
    capped = state.apply(as_read(cap=1).plan(state, ssm, 3))
    assert (capped.size[0] <= 2).all()
    assert members(capped, int((capped.pos[0] == 10).nonzero())) == [0, 10]  # the most similar wins


def test_most_similar_with_a_cap_is_the_greedy_matching():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        r, length, cap = 6, 9, 1 + trial % 3
        sim = torch.rand(2, r, length, generator=gen, dtype=torch.float64)
        allowed = torch.rand(2, length, generator=gen) < 0.6
        allowed[:, 0] = True
        got = most_similar(sim, allowed, cap)
        for b in range(2):
            room = max(cap, -(-r // int(allowed[b].sum())))
            edges = sorted(((float(sim[b, s, d]), s, d) for s in range(r) for d in range(length) if allowed[b, d]),
                           reverse=True)
            load, expected = {}, {}
            for _, s, d in edges:  # the independent slow reference: best edges first
                if s not in expected and load.get(d, 0) < room:
                    expected[s] = d
                    load[d] = load.get(d, 0) + 1
            assert got[b].tolist() == [expected[s] for s in range(r)]


def test_top_band_leaves_sources_and_a_destination():
    score = torch.tensor([[3.0, 1.0, 4.0, 1.5, 9.0, 2.0]])
    eligible = torch.tensor([[True, True, True, True, False, True]])
    assert top_band(score, eligible, 2, 1).nonzero()[:, 1].tolist() == [0, 2]
    assert top_band(score, eligible, 9, 2).sum() == 2  # 5 eligible - 2 sources - 1 destination


def test_mame_plain_weights_and_injection_importance():
    state = make_state(length=9, cls=4, seed=5)
    delta = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    b_norm = torch.tensor([[2.0, 0.1, 3.0, 3.0, 1.0, 3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    ssm = make_ssm(delta, b_norm)
    torch.testing.assert_close(injection_strength(ssm), delta * b_norm)
    plan = as_read(importance="injection", weight="plain").plan(state, ssm, 2)
    assert leaving(plan, 9) == [0, 1]  # Δ alone ties them all; Δ x ||B|| ranks 1 then 0 lowest
    new = state.apply(plan)
    tokens = (state.residual + state.hidden)[0]
    for slot in range(new.length):
        group = members(new, slot)
        torch.testing.assert_close(new.hidden[0, slot], tokens[group].mean(dim=0))


@pytest.mark.parametrize("options,message", [({"sources": "middle"}, "sources must be .least_delta., .spread."),
                                             ({"w_protect": -1}, "w_protect and cap must be >= 0"),
                                             ({"keep_top": 1.0}, r"keep_top must be in \[0, 1\)"),
                                             ({"importance": "B"}, "importance must be .delta., .delta_z. or .injection.")])
def test_mame_bad_new_options(options, message):
    with pytest.raises(ValueError, match=message):
        as_read(**options)


def test_mame_delta_z_importance_matches_a_slow_reference():
    from mambamerge.merge.mame import importance_score
    from mambamerge.tokens import SSMStats

    gen = torch.Generator().manual_seed(7)
    fwd, bwd = (torch.rand(2, 5, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    ssm = SSMStats(fwd, bwd, torch.ones(2, 3, 9, dtype=torch.float64), torch.ones(2, 3, 9, dtype=torch.float64))
    expected = torch.zeros(2, 9, dtype=torch.float64)
    for delta in (fwd, bwd):
        for b in range(2):
            for t in range(9):
                zs = []
                for c in range(5):
                    row = delta[b, c].tolist()
                    mean = sum(row) / 9
                    std = (sum((v - mean) ** 2 for v in row) / 9) ** 0.5
                    zs.append((row[t] - mean) / std)
                expected[b, t] += max(zs)
    torch.testing.assert_close(importance_score(ssm, "delta_z").double(), expected, rtol=1e-5, atol=1e-5)
    # the ranking follows the standardised channels; the merge weights stay the positive mean Δ
    state = make_state(length=9, cls=4)
    plan = as_read(importance="delta_z").plan(state, ssm._replace(delta_fwd=fwd[:1], delta_bwd=bwd[:1],
                                                                B_fwd=ssm.B_fwd[:1], B_bwd=ssm.B_bwd[:1]), 2)
    z = expected[0].clone()
    z[4] = float("inf")
    assert leaving(plan, 9) == sorted(z.topk(2, largest=False).indices.tolist())
    assert (plan.weight > 0).all()


def test_no_method_option_is_taken_by_patch_itself():
    import inspect

    from mambamerge.merge import METHODS
    from mambamerge.patch import patch

    taken = set(inspect.signature(patch).parameters) - {"options"}
    for name, cls in METHODS.items():
        assert not taken & set(cls.options()), name


def test_mame_defaults_protect_the_class_tokens_neighbours_and_space_the_sources_evenly():
    state = make_state(length=61, cls=30, dim=8, seed=6)
    delta = torch.rand(1, 61, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1
    assert MaMe().w_protect == 24 and MaMe().protected_width(61, 6) == 24
    new = state.apply(MaMe().plan(state, make_ssm(delta), 6))
    # outside the window: tokens 0-5 and 55-60, cut into 6 runs of 2; the first of each leaves
    assert sorted(set(range(61)) - set(new.pos[0].tolist())) == [0, 2, 4, 55, 57, 59]
    for original in range(6, 55):  # the window: never merged away, nothing merged in
        assert members(new, int(new.source[0, :, original].argmax())) == [original]


@pytest.mark.parametrize("ignored", [{"sources": "spread"}, {"keep_top": 0.3}, {"cap": 1}, {"scope": "frame"}])
def test_mame_bipartite_refuses_the_options_it_ignores(ignored):
    (name, value), = ignored.items()
    with pytest.raises(ValueError, match=rf"match='bipartite' ignores {name} \(got {name}={value!r}\)"):
        MaMe(match="bipartite", **ignored)
    MaMe(match="bipartite", delta_penalty=2.0, w_protect=4)  # the options it does use


def test_every_text_option_is_checked_against_its_literal():
    checked = 0
    for cls in METHODS.values():
        for option, kind in get_type_hints(cls).items():
            if get_origin(kind) is Literal:
                with pytest.raises(ValueError, match=rf"^{cls.name}: {option} must be .*got 'bogus'$"):
                    cls(**{option: "bogus"})
                checked += 1
    assert checked >= 20
