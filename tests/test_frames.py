"""Frame-aware reduction (merge/frames.py; MaMe's scope and balance, STM's and ToMe's scope): the class token
stays, token order within and across frames is kept, the reduction is exact, scopes keep every group
inside its frame or its spatial position, budgets are balanced as a slow reference says, and layouts
without frames refuse the options by name."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mambamerge
from mambamerge.merge.frames import balanced_counts, runs_by_frame
from mambamerge.tokens import TokenLayout
from test_family_merging import inputs, small

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VIDEO_OPTIONS = [("mame", {"scope": "frame"}), ("mame", {"scope": "tube"}), ("mame", {"balance": "frame"}),
                 ("mame", {"balance": "frame", "scope": "frame", "w_protect": 0}),
                 ("mame", {"scope": "tube", "sources": "random", "w_protect": 2}), ("stm", {"scope": "frame"}),
                 ("tome", {"scope": "frame"}), ("rmeeto", {"scope": "frame"})]


def slow_coordinates(layout, slot):
    """Reference: enumerate the patches in row-major order and insert the class token."""
    cells = [()]
    for extent in layout.grid:
        cells = [c + (i,) for c in cells for i in range(extent)]
    seq = list(cells)
    if layout.cls_index is not None:
        seq.insert(layout.cls_index, tuple(-1 for _ in layout.grid))
    return seq[slot]


@pytest.mark.parametrize("layout", [TokenLayout((2, 3, 4), ("frame", "row", "col"), "head"),
                                    TokenLayout((3, 5), ("row", "col"), "middle"),
                                    TokenLayout((4, 2), ("freq", "time"), "middle"),
                                    TokenLayout((3, 2, 2), ("frame", "row", "col"), "none")])
def test_patch_coordinates_match_the_row_major_grid(layout):
    coords = layout.patch_coordinates(torch.arange(layout.length))
    assert [tuple(c.tolist()) for c in coords] == [slow_coordinates(layout, s) for s in range(layout.length)]


def slow_balanced(frame, eligible, frames, r, keep):
    """Reference: one token at a time from the frame with the most tokens left (earliest on ties)."""
    now = [sum(1 for f in frame if f == g) for g in range(frames)]
    most = [sum(1 for f, e in zip(frame, eligible) if f == g and e) for g in range(frames)]
    if sum(max(m - keep, 0) for m in most) >= r:
        most = [max(m - keep, 0) for m in most]
    given = [0] * frames
    for _ in range(r):
        g = max((g for g in range(frames) if given[g] < most[g]), key=lambda g: (now[g] - given[g], -g))
        given[g] += 1
    return given


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 1), st.integers(0, 10_000))
def test_balanced_counts_match_one_at_a_time(frames, per_frame, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    length = frames * per_frame + 1
    frame = torch.cat((torch.tensor([-1]), torch.arange(frames).repeat_interleave(per_frame)))
    frame = torch.cat((frame[:1], frame[1:][torch.randperm(length - 1, generator=gen)].sort().values))
    eligible = (torch.rand(length, generator=gen) < 0.7) & (frame >= 0)
    r = int(torch.randint(0, int(eligible.sum()) + 1, (1,), generator=gen))
    counts = balanced_counts(frame[None], eligible[None], frames, r, keep)[0]
    assert counts.tolist() == slow_balanced(frame.tolist(), eligible.tolist(), frames, r, keep)
    runs = runs_by_frame(frame[None], eligible[None], counts[None])[0]
    assert sorted(set(runs[runs < r].tolist())) == list(range(r))  # every run has a token
    for g in range(r):  # a run lies in one frame
        assert len(set(frame[runs == g].tolist())) == 1


@pytest.mark.parametrize("method,options", VIDEO_OPTIONS)
@pytest.mark.parametrize("reduction", [0.2, 0.3])
def test_frame_options_keep_class_token_order_and_reduction(method, options, reduction):
    model = small("videomamba", seed=3)
    layout = model.layout
    mambamerge.patch(model, method, reduction=reduction, track_source=True, **options)
    expected = mambamerge.reduction_summary(model)["final_tokens"]
    clips = inputs(model, 3, seed=1)
    with torch.no_grad():
        out = model(clips)
        state = model.token_state(clips)
    assert torch.isfinite(out).all()
    assert state.length == expected
    assert (state.cls_index == 0).all() and (state.pos[:, 0] == 0).all()  # the class token, at the head
    assert state.source[:, 0, 0].eq(1).all() and state.source[:, 0].sum(dim=1).eq(1).all()  # it holds itself only
    assert (state.pos.diff(dim=1) > 0).all()  # survivors in their slots' order, within and across frames
    assert state.source.sum(dim=1).eq(1).all()  # every original token is held exactly once


@pytest.mark.parametrize("options,schedule", [({"scope": "tube", "w_protect": 0}, [0, 3]),
                                              ({"scope": "frame", "balance": "frame", "w_protect": 0}, [0, 5, 6])])
def test_scopes_keep_groups_in_one_place_or_frame(options, schedule):
    """Schedules where every leaving token has an allowed token in its scope (no fallback): tube groups
    hold one spatial position and sit in their earliest slot; frame groups hold one frame."""
    model = small("videomamba", seed=4)
    layout = model.layout
    mambamerge.patch(model, "mame", schedule=schedule, track_source=True, **options)
    with torch.no_grad():
        state = model.token_state(inputs(model, 3, seed=2))
    coords = layout.patch_coordinates(torch.arange(layout.length))  # (L0, axes)
    merged = 0
    for b in range(3):
        for i in range(state.length):
            members = state.source[b, i].nonzero()[:, 0]
            merged += len(members) > 1
            if options["scope"] == "tube":
                assert len({tuple(c) for c in coords[members, 1:].tolist()}) == 1
                assert int(state.pos[b, i]) == int(members.min())
            else:
                assert len(set(coords[members, 0].tolist())) == 1
    assert merged  # something merged


@pytest.mark.parametrize("method,options", [("mame", {"scope": "tube"}), ("mame", {"balance": "frame"}),
                                            ("mame", {"scope": "frame", "balance": "frame"}),
                                            ("stm", {"scope": "frame"}), ("tome", {"scope": "frame"})])
@pytest.mark.parametrize("family", ["aum:Bi-Bi", "vim"])
def test_layouts_without_frames_refuse_the_options_by_name(method, options, family):
    if family == "vim":
        torch.manual_seed(0)
        model = mambamerge.create_model("vim_tiny", embed_dim=16, depth=3, img_size=32, patch_size=8, d_state=4,
                                        num_classes=5)
    else:
        model = small(family)
    first = next(iter(options))
    with pytest.raises(ValueError, match=rf"{first}={options[first]!r}.*frames"):
        mambamerge.patch(model, method, reduction=0.3, **options)


def test_the_defaults_still_run_on_layouts_without_frames():
    model = small("aum:Bi-Bi")
    mambamerge.patch(model, "mame", reduction=0.3, scope="free", balance="none")
    with torch.no_grad():
        assert torch.isfinite(model(inputs(model, 2, seed=0))).all()


@pytest.mark.parametrize("options,message", [({"scope": "space"}, "scope must be"), ({"balance": "row"}, "balance"),
                                             ({"balance": "frame", "sources": "least_delta"}, "uniform"),
                                             ({"scope": "tube", "match": "bipartite"}, "bipartite")])
def test_bad_frame_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        mambamerge.merge.METHODS["mame"](**options)


@pytest.mark.parametrize("options,message", [({"scope": "tube"}, "'free' or 'frame', got 'tube'"),
                                             ({"scope": "space"}, "'free' or 'frame'")])
def test_tome_refuses_scopes_it_cannot_honour(options, message):
    with pytest.raises(ValueError, match=message):
        mambamerge.merge.METHODS["tome"](**options)


@pytest.mark.parametrize("method", ["tome", "tome_unordered"])
def test_tome_frame_scope_keeps_merges_in_one_frame(method):
    """Within every frame of the small clip there are A -> B edges to spare at these steps, so no group
    straddles two frames; without the scope some do (the test would catch a scope that does nothing)."""
    layout = small("videomamba").layout
    coords = layout.patch_coordinates(torch.arange(layout.length))  # (L0, axes)
    straddling = {}
    for scope in ("frame", "free"):
        model = small("videomamba", seed=5)
        mambamerge.patch(model, method, schedule=[0, 4, 4], track_source=True, scope=scope)
        with torch.no_grad():
            state = model.token_state(inputs(model, 3, seed=4))
        straddling[scope] = sum(len(set(coords[state.source[b, i].nonzero()[:, 0], 0].tolist())) > 1
                                for b in range(3) for i in range(state.length))
    assert straddling["frame"] == 0 and straddling["free"] > 0
