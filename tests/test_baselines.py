"""The baselines: ToMe (ordered and unordered), R-MeeTo, ToP-ViM, EViT and random pruning."""
import pytest
import torch

import mambamerge
from mambamerge.merge import METHODS
from mambamerge.merge.base import delta_importance
from mambamerge.merge.pruning import EViT, RandomPrune, ToP
from mambamerge.merge.state import TokenState
from mambamerge.merge.tome import RMeeTo, ToMe, ToMeUnordered
from mambamerge.tokens import SSMStats, TokenLayout
from conftest import perturb_

VIM = TokenLayout((14, 14), ("row", "col"), "middle")

BASELINES = ["tome", "tome_unordered", "rmeeto", "top", "evit", "random"]
MERGING = {"tome", "tome_unordered", "rmeeto", "evit"}
GRID = 6  # 36 patches + the class token at 18
SCHEDULE = [0, 3, 2, 4]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = mambamerge.create_model("vim_pico", depth=4, img_size=8 * GRID, d_state=4)
    return perturb_(m).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 8 * GRID, 8 * GRID, generator=torch.Generator().manual_seed(1))


def final_state(model, images, method, schedule=SCHEDULE, **options):
    mambamerge.patch(model, method, schedule=schedule, track_source=True, **options)
    with torch.no_grad():
        logits = model(images)
        state = model.token_state(images)
    mambamerge.unpatch(model)
    return state, logits


def hand_state(batch, length, dim, cls_index, seed=0):
    """A state after some block: random streams, the class token at cls_index[b], source map on."""
    gen = torch.Generator().manual_seed(seed)
    start = TokenState.start(torch.randn(batch, length, dim, generator=gen), TokenLayout((length,), ("token",), "none"),
                             track_source=True)
    return TokenState(hidden=start.hidden, residual=torch.randn(batch, length, dim, generator=gen),
                      size=start.size, pos=start.pos, cls_index=torch.tensor(cls_index), source=start.source)


def ssm_with_importance(score, d_inner=4, d_state=2):
    """SSMStats whose delta_importance is `score` (B, L)."""
    batch, length = score.shape
    delta = score[:, None, :].expand(-1, d_inner, -1) / 2
    b = torch.ones(batch, d_state, length)
    return SSMStats(delta_fwd=delta, delta_bwd=delta, B_fwd=b, B_bwd=b)


def make(name, **options):
    return METHODS[name](**options)


@pytest.mark.parametrize("name,options", [(n, {}) for n in BASELINES] + [("evit", {"importance": "norm"}),
                                                                       ("top", {"clip": "abs"})])
def test_counts_sizes_and_class_token_in_a_model(model, images, name, options):
    state, logits = final_state(model, images, name, **options)
    patches, cls = GRID * GRID, model.cls_index
    assert state.length == patches + 1 - sum(SCHEDULE) and torch.isfinite(logits).all()
    rows = torch.arange(images.shape[0])
    assert (state.pos[rows, state.cls_index] == cls).all()
    assert (state.size[rows, state.cls_index] == 1).all()
    assert (state.source[rows, state.cls_index] == torch.eye(patches + 1)[cls]).all()
    assert torch.equal(state.size, state.source.sum(dim=2))
    assert (state.source.sum(dim=1) <= 1).all()
    non_cls = (state.size * ~state.cls_mask()).sum(dim=1)
    if name in MERGING:
        assert (non_cls == patches).all()
    else:  # pruning: each survivor is one patch, the dropped ones are gone
        assert (state.size == 1).all() and (non_cls == state.length - 1).all()
    if name == "evit":  # everything in sequence order except the last step's fused token at the end
        assert (state.pos[:, :-1].diff(dim=1) > 0).all() and (state.size[:, -1] > 1).all()
    elif name != "tome_unordered":
        assert (state.pos.diff(dim=1) > 0).all()


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("cls_index", [[4, 7], [7, 4]])
def test_class_token_value_moves_untouched(name, cls_index):
    state = hand_state(2, 11, 8, cls_index)
    score = torch.rand(2, 11, generator=torch.Generator().manual_seed(3)) + 0.1
    new = state.apply(make(name).plan(state, ssm_with_importance(score), 4))
    rows = torch.arange(2)
    assert new.length == 7
    tokens = state.residual + state.hidden  # the two streams, added for the next block
    assert torch.equal(new.hidden[rows, new.cls_index], tokens[rows, state.cls_index]) and new.residual is None
    assert torch.equal(new.pos[rows, new.cls_index], state.cls_index)


@pytest.mark.parametrize("cls_index", [4, 5])
def test_tome_unordered_is_even_survivors_then_odd(cls_index):
    state = hand_state(1, 11, 8, [cls_index])
    r = 3
    unordered = ToMeUnordered().plan(state, None, r)
    ordered = ToMe().plan(state, None, r)
    leaving = set(range(11)) - set(ordered.rep[0].tolist())
    assert len(leaving) == r and all(i % 2 == 0 and i != cls_index for i in leaving)
    survivors = sorted(set(range(11)) - leaving)
    layout = [i for i in survivors if i % 2 == 0] + [i for i in survivors if i % 2 == 1]
    assert unordered.rep[0].tolist() == layout
    assert ordered.rep[0].tolist() == survivors
    new = state.apply(unordered)
    assert new.cls_index.item() == layout.index(cls_index)
    assert new.pos[0].tolist() == layout
    # the same merges, only the order differs
    assert torch.equal(unordered.rep.gather(1, unordered.assign), ordered.rep.gather(1, ordered.assign))


def test_tome_merges_two_identical_tokens_into_that_token():
    state = hand_state(1, 9, 16, [4])
    x = torch.randn(16)
    hidden, residual = state.hidden.clone(), state.residual.clone()
    hidden[0, 2], hidden[0, 3], residual[0, 2], residual[0, 3] = x, x, 2 * x, 2 * x
    state = state.with_streams(hidden, residual)
    for method in (ToMe(), RMeeTo(), ToMe(feature="hidden")):
        new = state.apply(method.plan(state, None, 1))
        assert new.pos[0].tolist() == [0, 1, 3, 4, 5, 6, 7, 8]
        assert torch.equal(new.hidden[0, 2], 3 * x) and new.residual is None
        assert new.size[0].tolist() == [1, 1, 2, 1, 1, 1, 1, 1]


def test_tome_merge_is_size_weighted():
    state = hand_state(1, 5, 4, [4])
    state = TokenState(hidden=state.hidden, residual=state.residual, size=torch.tensor([[3.0, 1, 1, 1, 1]]),
                       pos=state.pos, cls_index=state.cls_index)
    new = state.apply(ToMe().plan(state, None, 1))  # A = {0, 2} (4 is the class token), B = {1, 3}
    src = ({0, 1, 2, 3, 4} - set(new.pos[0].tolist())).pop()
    dst = [1, 3][int((state.residual[0, src] @ state.residual[0, 3]) / state.residual[0, 3].norm()
                     > (state.residual[0, src] @ state.residual[0, 1]) / state.residual[0, 1].norm())]
    w_src, w_dst = state.size[0, src], state.size[0, dst]
    tokens = state.residual + state.hidden
    expected = (w_src * tokens[0, src] + w_dst * tokens[0, dst]) / (w_src + w_dst)
    torch.testing.assert_close(new.hidden[0, new.pos[0].tolist().index(dst)], expected)


def test_tome_removes_at_most_half(model):
    for length in range(1, 300):
        assert 2 * ToMe().capacity(length, VIM) < length
    assert ToMe().capacity(197, VIM) == 98 and ToMe().capacity(3, VIM) == 0
    with pytest.raises(ValueError, match="asks for 19 tokens before block 1, but only 18"):
        mambamerge.patch(model, "tome", schedule=[0, 19])
    with pytest.raises(ValueError, match="but only 18"):
        mambamerge.patch(model, "rmeeto", schedule=[0, 19])
    mambamerge.patch(model, "tome", schedule=[0, 18, 9])
    mambamerge.unpatch(model)


def test_rmeeto_compares_hidden_states_and_documents_its_schedule(model):
    assert RMeeTo().feature == "hidden" and ToMe().feature == "residual"
    assert "start=2" in RMeeTo.__doc__ and "every=2" in RMeeTo.__doc__
    mambamerge.patch(model, "rmeeto", schedule="constant", r=5)
    assert model.token_reducer.schedule.removals == (0, 0, 5, 0)
    mambamerge.unpatch(model)


@pytest.mark.parametrize("clip,dropped", [("relu", 1), ("abs", 1), ("none", 0)])
def test_top_drops_the_least_important_by_its_clipping(clip, dropped):
    hidden = torch.tensor([[[5.0, -10], [1, 0], [3, 0], [0, 0], [4, 0], [6, 0], [7, 0]]])
    state = TokenState(hidden=hidden, residual=hidden.clone(), size=torch.ones(1, 7),
                       pos=torch.arange(7)[None], cls_index=torch.tensor([3]))
    new = state.apply(ToP(clip=clip).plan(state, None, 1))
    assert new.pos[0].tolist() == [i for i in range(7) if i != dropped]
    assert new.cls_index.item() == 2


@pytest.mark.parametrize("fused_slot", ["end", "cls_next"])
def test_evit_fuses_exactly_the_least_important(fused_slot):
    state = hand_state(1, 9, 6, [4])
    score = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.05, 0.8, 0.2, 0.7, 0.6]])  # the class token's is lowest
    r = 3
    new = state.apply(EViT(fused_slot=fused_slot).plan(state, ssm_with_importance(score), r))
    fused_members = [1, 6, 3, 0]  # lowest first; 0 is the most important of them
    kept = [2, 4, 5, 7, 8]
    assert new.length == 9 - r
    at = new.length - 1 if fused_slot == "end" else new.cls_index.item() + 1
    assert new.source[0, at].nonzero().flatten().tolist() == sorted(fused_members)
    assert new.size[0, at] == 4 and new.pos[0, at] == 0
    w = score[0, fused_members]
    expected = (w[:, None] * (state.residual + state.hidden)[0, fused_members]).sum(0) / w.sum()
    torch.testing.assert_close(new.hidden[0, at], expected)
    others = [p for i, p in enumerate(new.pos[0].tolist()) if i != at]
    assert others == kept
    assert new.pos[0, new.cls_index].item() == 4


def test_evit_puts_an_earlier_fused_token_back_in_sequence_order():
    state = hand_state(1, 9, 6, [4])
    first = EViT().plan(state, ssm_with_importance(torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.05, 0.8, 0.2, 0.7, 0.6]])), 1)
    state = state.apply(first)  # tokens 1 and 6 fused at the end, in 6's slot: pos [0, 2, 3, 4, 5, 7, 8, 6]
    assert state.pos[0].tolist() == [0, 2, 3, 4, 5, 7, 8, 6]
    second = EViT().plan(state, ssm_with_importance(torch.tensor([[0.1, 0.2, 0.9, 0.05, 0.8, 0.7, 0.6, 0.5]])), 1)
    new = state.apply(second)  # 0 and 2 fused in 2's slot; the earlier fused token returns to slot 6
    assert new.pos[0].tolist() == [3, 4, 5, 6, 7, 8, 2]


def test_ssm_statistics_are_requested_only_when_read():
    assert EViT().needs_ssm and not EViT(importance="norm").needs_ssm
    for name in ("tome", "tome_unordered", "rmeeto", "top", "random"):
        assert not make(name).needs_ssm
    state = hand_state(1, 9, 6, [4])
    with pytest.raises(ValueError, match="needs the SSM step sizes"):
        EViT().plan(state, None, 2)


def test_evit_delta_importance_is_mames():
    score = torch.rand(2, 9) + 0.1
    torch.testing.assert_close(delta_importance(ssm_with_importance(score)), score)


def test_random_is_reproducible_per_seed(model, images):
    runs = [final_state(model, images, "random", seed=seed)[0].pos for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    state = hand_state(2, 30, 4, [15, 15])
    method = RandomPrune(seed=5)
    first, second = method.plan(state, None, 10).rep, method.plan(state, None, 10).rep
    assert not torch.equal(first, second)  # the generator advances between steps
    assert not torch.equal(first[0], first[1])  # each image has its own draw
    assert torch.equal(RandomPrune(seed=5).plan(state, None, 10).rep, first)


def test_the_draws_are_uniform_independent_and_reproducible():
    from mambamerge.merge.noise import Draws

    cpu = torch.device("cpu")
    draws = Draws(7)
    first = draws.uniform((2000, 20), cpu)
    assert torch.equal(Draws(7).uniform((2000, 20), cpu), first)
    assert not torch.equal(Draws(8).uniform((2000, 20), cpu), first)
    assert not torch.equal(draws.uniform((2000, 20), cpu), first)  # each call draws anew
    assert 0.0 <= first.min() and first.max() < 1.0
    # the 5 lowest of 20 tokens: every token chosen about 2000 * 5 / 20 = 500 times (binomial sd 19)
    counts = torch.bincount(first.topk(5, dim=1, largest=False).indices.flatten(), minlength=20)
    assert counts.min() > 420 and counts.max() < 580, counts
    neighbours = torch.corrcoef(torch.stack([first[:, :-1].flatten(), first[:, 1:].flatten()]))[0, 1]
    rows = torch.corrcoef(torch.stack([first[:-1].flatten(), first[1:].flatten()]))[0, 1]
    assert abs(neighbours) < 0.03 and abs(rows) < 0.03


@pytest.mark.parametrize("name", ["tome", "tome_unordered", "rmeeto", "top", "evit"])
def test_a_batch_gives_each_image_its_own_result(model, images, name):
    batched, logits = final_state(model, images, name)
    for i in range(images.shape[0]):
        alone, single = final_state(model, images[i:i + 1], name)
        assert torch.equal(alone.pos[0], batched.pos[i])
        torch.testing.assert_close(single[0], logits[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,listed", [("tome", "feature='residual'"), ("tome_unordered", "feature='residual'"),
                                         ("rmeeto", "feature='hidden'"), ("top", "clip='relu'"),
                                         ("evit", "importance='delta', fused_slot='end'"), ("random", "seed=0")])
def test_unknown_options_list_the_valid_ones(model, name, listed):
    with pytest.raises(ValueError, match=f"unknown option.*foo.*{name!r}.*{listed}"):
        mambamerge.patch(model, name, foo=1)


@pytest.mark.parametrize("cls,options,message", [
    (ToMe, dict(feature="keys"), "feature must be"), (RMeeTo, dict(feature="x"), "feature must be"),
    (ToP, dict(clip="sigmoid"), "top: clip must be"), (EViT, dict(importance="attn"), "evit: importance must be"),
    (EViT, dict(fused_slot="start"), "evit: fused_slot must be")])
def test_bad_option_values_are_errors(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)
