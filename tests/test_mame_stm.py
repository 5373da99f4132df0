"""The two methods of the mission, checked on hand-made token sequences."""
import pytest
import torch

import mambamerge
from mambamerge.merge import MaMe, STM
from mambamerge.merge.mame import PAPER_AS_READ
from mambamerge.merge.state import TokenState
from mambamerge.merge.stm import injection_strength
from mambamerge.tokens import SSMStats, TokenLayout
from conftest import perturb_


def as_read(**changes):
    """MaMe as the paper was first read (mame.PAPER_AS_READ), with some options changed."""
    return MaMe(**{**PAPER_AS_READ, **changes})


def make_state(length=11, dim=6, cls=5, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    state = TokenState.start(tokens, TokenLayout((length - 1,), ("token",), "middle"), track_source=True)
    assert state.cls_index.tolist() == [cls] * batch
    return state.with_streams(tokens * 0.5, tokens)


def make_ssm(delta_per_token, b_norm=None, d_inner=4, n_state=3):
    """SSMStats whose mean Δ per token is delta_per_token (B, L) in both directions."""
    delta = delta_per_token[:, None, :].expand(-1, d_inner, -1).clone()
    b = torch.ones(delta.shape[0], n_state, delta.shape[2], dtype=delta.dtype)
    if b_norm is not None:
        b = b * (b_norm / n_state ** 0.5)[:, None, :]
    return SSMStats(delta, delta, b, b)


def test_mame_merges_the_least_important_tokens_into_their_most_similar_survivor():
    state = make_state()
    feat = state.residual.clone()
    feat[0, 2] = 3 * feat[0, 8] + 0.01  # token 2 is nearly parallel to token 8
    state = TokenState(state.hidden, feat, state.size, state.pos, state.cls_index, state.source)
    delta = torch.linspace(1.0, 2.0, 11, dtype=torch.float64)[None].clone()
    delta[0, 2] = 0.01  # least important
    delta[0, 5] = 0.001  # the class token: lowest of all, but never a source
    ssm = make_ssm(delta)
    new = state.apply(as_read().plan(state, ssm, 1))
    assert new.length == 10
    holder = int(new.source[0, :, 2].argmax())
    assert new.pos[0, holder] == 8 and new.size[0, holder] == 2
    s = 2 * delta[0]  # forward + backward mean Δ
    w2, w8 = s[2], s[8]
    tokens = feat + state.hidden  # the sum of the two streams, which the next block takes
    expected = (w2 * tokens[0, 2] + w8 * tokens[0, 8]) / (w2 + w8)
    torch.testing.assert_close(new.hidden[0, holder], expected)
    assert new.residual is None
    assert new.cls_index.item() == 4 and (new.pos.diff(dim=1) > 0).all()


def test_mame_important_placement_moves_the_token_to_its_strongest_member():
    state = make_state()
    delta = torch.ones(1, 11, dtype=torch.float64)
    delta[0, 1] = 0.1
    plan = as_read(placement="important").plan(state, make_ssm(delta), 1)
    new = state.apply(plan)
    holder = int(new.source[0, :, 1].argmax())
    members = new.source[0, holder].nonzero().flatten().tolist()
    assert 1 in members and len(members) == 2
    assert new.pos[0, holder] == [m for m in members if m != 1][0]  # the survivor outranks token 1
    assert (new.pos.diff(dim=1) > 0).all()


def test_mame_window_match_stays_local():
    state = make_state(length=21, cls=10, seed=3)
    delta = torch.rand(1, 21, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    new = state.apply(as_read(match="window", window=2).plan(state, make_ssm(delta), 5))
    for row, slot in zip(new.source[0], new.pos[0]):
        assert ((row.nonzero().flatten() - slot).abs() <= 2).all()


def test_stm_merges_only_sequence_neighbours_outside_the_protected_window():
    model = perturb_(mambamerge.create_model("vim_pico", depth=6, img_size=56, patch_size=4, stride=4)).eval()
    mambamerge.patch(model, "stm", schedule=[0, 20, 16, 12, 10, 8], track_source=True)
    with torch.no_grad():
        state = model.token_state(torch.randn(2, 3, 56, 56))
    cls = model.cls_index
    for b in range(2):
        for row in state.source[b]:
            members = row.nonzero().flatten()
            assert members.tolist() == list(range(int(members.min()), int(members.max()) + 1))  # contiguous
        near = state.source[b][:, cls - 4:cls + 5].sum(dim=0)
        assert (near == 1).all()
        left = int(state.cls_index[b])
        assert abs(left - (state.length - 1 - left)) <= 1  # as many merges on each side


def test_stm_weights_come_from_the_previous_layers_delta_and_B():
    state = make_state(length=15, cls=7)
    delta = torch.rand(1, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    b_norm = torch.rand(1, 15, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    ssm = make_ssm(delta, b_norm)
    torch.testing.assert_close(injection_strength(ssm), delta * b_norm)
    for mode in ("mean", "sum"):
        plan = STM(w_protect=2, mode=mode).plan(state, ssm, 2)
        new = state.apply(plan)
        merged = [j for j in range(new.length) if new.size[0, j] == 2]
        assert len(merged) == 2
        for j in merged:
            members = new.source[0, j].nonzero().flatten()
            w = (delta * b_norm)[0, members]
            dst = int(new.pos[0, j])
            denom = w.sum() if mode == "mean" else (delta * b_norm)[0, dst]
            expected = (w[:, None] * (state.residual + state.hidden)[0, members]).sum(0) / denom
            torch.testing.assert_close(new.hidden[0, j], expected)


def test_stm_refuses_more_merges_than_adjacent_pairs_allow():
    state = make_state(length=11, cls=5)
    with pytest.raises(ValueError, match="outside the protected window"):
        STM(w_protect=4, weight="size").plan(state, None, 4)


@pytest.mark.parametrize("sources", ["least_delta", "most_delta", "random"])
def test_mame_source_ablation_picks_by_its_rule(sources):
    state = make_state(length=11, cls=5)
    delta = torch.linspace(0.1, 1.0, 11, dtype=torch.float64)[None]
    plan = as_read(sources=sources, seed=3).plan(state, make_ssm(delta), 3)
    leaving = sorted(set(range(11)) - set(plan.rep[0].tolist()))
    assert len(leaving) == 3 and 5 not in leaving
    if sources == "least_delta":
        assert leaving == [0, 1, 2]
    elif sources == "most_delta":
        assert leaving == [8, 9, 10]
    else:  # seeded: the same draw from a fresh method with the same seed
        again = as_read(sources=sources, seed=3).plan(state, make_ssm(delta), 3)
        assert torch.equal(plan.rep, again.rep)
