"""`mambamerge diagnose` and `visualize` on Audio Mamba and VideoMamba checkpoints with their data, and the
pictures' placement of patches on spectrograms and clips (mambamerge.diagnostics.canvas)."""
import json

import pytest
import torch
from PIL import Image

import mambamerge
from mambamerge.cli.main import main
from mambamerge.diagnostics.canvas import (PatchGeometry, grid_planes, group_pictures, leading_panels,
                                           patch_geometry, pixel_owners, spread)
from mambamerge.diagnostics.groups import patch_slots
from mambamerge.tokens import TokenLayout
from conftest import perturb_


def tiny_aum():
    """Overlapping patches in time (kernel 16, stride 8): 8 x 3 (freq x time) patches of 128 x 32."""
    torch.manual_seed(0)
    return perturb_(mambamerge.create_model("aum_nano", embed_dim=16, depth=3, spec_size=(128, 32), stride=(16, 8),
                                            num_classes=10))


def tiny_videomamba():
    """Tubelets of 2 frames: 4 x 4 x 4 (frame x row x col) patches of 8 frames of 32 x 32."""
    torch.manual_seed(0)
    return perturb_(mambamerge.create_model("videomamba_nano", embed_dim=16, depth=3))


def decoded(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


@pytest.mark.parametrize("make", [tiny_aum, tiny_videomamba])
def test_spread_puts_each_position_under_a_patch_the_embedding_reads_it_into(make):
    model = make().eval()
    layout, geometry = model.layout, patch_geometry(model)
    shape = tuple(model.input_shape)
    x = torch.randn(1, *shape)
    slots = patch_slots(layout)
    with torch.no_grad():
        base = model.embed(x)[0, slots]
    owner_of = spread(torch.arange(layout.num_patches, dtype=torch.float64)[None], layout.grid, geometry,
                      grid_planes(x, layout, model.input_kind).shape[1:])[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        where = tuple(int(torch.randint(0, n, (1,), generator=gen)) for n in shape)
        nudged = x.clone()
        nudged[(0, *where)] += 10.0
        with torch.no_grad():
            reading = ((model.embed(nudged)[0, slots] - base).abs().amax(1) > 1e-6).nonzero().flatten().tolist()
        onehot = torch.zeros(1, *shape)
        onehot[(0, *where)] = 1.0
        on_plane = grid_planes(onehot, layout, model.input_kind)[0].nonzero()[0].tolist()
        owner = owner_of[tuple(on_plane)]
        assert reading and int(owner) in reading, (where, on_plane, reading, owner)


def test_pixel_owners_take_the_nearest_covering_patch():
    for extent, kernel, stride, padding in ((13, 4, 3, 0), (12, 4, 4, 0), (10, 2, 3, 0), (11, 5, 2, 2)):
        count = (extent + 2 * padding - kernel) // stride + 1
        owners = pixel_owners(extent, count, kernel, stride, padding)
        for position in range(extent):
            covering = [i for i in range(count) if i * stride - padding <= position < i * stride - padding + kernel]
            if not covering:
                assert owners[position] == -1
                continue
            distance = [abs(position - (i * stride - padding + (kernel - 1) / 2)) for i in covering]
            assert abs(position - (int(owners[position]) * stride - padding + (kernel - 1) / 2)) == min(distance)
    with pytest.raises(ValueError, match="do not span"):
        pixel_owners(12, 4, 4, 4)


def test_a_hand_made_group_is_drawn_on_its_spectrogram_patches():
    layout = TokenLayout((2, 3), ("freq", "time"))
    geometry = PatchGeometry((4, 4), (4, 4), (0, 0))
    spectrogram = torch.zeros(1, 12, 8)  # (B, T frames, F bins)
    spectrogram[0, 9, 6] = 1.0  # frame 9, bin 6: freq patch 1, time patch 2
    planes = grid_planes(spectrogram, layout, "spectrograms")
    assert planes.shape == (1, 8, 12) and planes[0, 6, 9] == 1.0
    # patch 4 = (freq 1, time 1) joins patch 1 = (freq 0, time 1); patch 5 = (freq 1, time 2) is dropped
    groups = torch.tensor([[0, 1, 2, 3, 1, -1]])
    picture = group_pictures(planes, groups, layout.grid, geometry)[0]  # (F, T, 3)
    colour = {patch: picture[4 * (patch // 3), 4 * (patch % 3)] for patch in range(6)}
    assert torch.equal(picture[4:8, 4:8], colour[1].expand(4, 4, 3))  # the whole of patch 4 in group 1's colour
    assert torch.equal(picture[0:4, 4:8], colour[1].expand(4, 4, 3))
    assert len({tuple(colour[p].tolist()) for p in (0, 1, 2, 3)}) == 4
    dropped = torch.zeros(4, 4, 3)
    dropped[2, 1] = 0.45  # black, under the one loud pixel's grey
    assert torch.equal(picture[4:8, 8:12], dropped)


def test_a_hand_made_group_is_drawn_on_its_clip_frames():
    layout = TokenLayout((2, 2, 2), ("frame", "row", "col"), cls="head")
    geometry = PatchGeometry((2, 2, 2), (2, 2, 2), (0, 0, 0))
    clip = torch.rand(1, 1, 4, 4, 4)  # (B, C, T, H, W)
    planes = grid_planes(clip, layout, "clips")
    assert torch.equal(planes[0], clip[0, 0])
    groups = torch.arange(8)[None].clone()
    groups[0, 5] = 0  # (frame 1, row 0, col 1) joins (frame 0, row 0, col 0)
    colours = spread(torch.eye(8)[groups[0]][None], layout.grid, geometry, planes.shape[1:])[0]  # one-hot per group
    assert colours[2:4, 0:2, 2:4, 0].eq(1).all() and colours[0:2, 0:2, 0:2, 0].eq(1).all()
    assert colours[..., 0].sum() == 16 and colours[2:4, 0:2, 0:2, 4].eq(1).all()
    picture = group_pictures(planes, groups, layout.grid, geometry)[0]
    shade = (planes[0] - planes[0].min()) / (planes[0].max() - planes[0].min())
    group_colour = (picture[0, 0, 0] - 0.45 * shade[0, 0, 0]) / 0.55
    torch.testing.assert_close((picture[3, 1, 3] - 0.45 * shade[3, 1, 3]) / 0.55, group_colour)
    assert leading_panels(planes.shape[1:], layout, geometry) == [(0, "frame 0-1"), (2, "frame 2-3")]


@pytest.mark.parametrize("make, data", [(tiny_aum, "fsdd"), (tiny_videomamba, "moving-fashion-mnist")])
def test_diagnose_and_visualize_an_audio_and_a_video_checkpoint(tmp_path, capsys, make, data):
    model = make()
    path = mambamerge.save_checkpoint(model, tmp_path / "model.safetensors")
    common = ["--checkpoint", str(path), "--data", data, "--split", "test", "--threads", "1"]
    assert main(["diagnose", *common, "--images", "4", "--loo-images", "2", "--loo-blocks", "2",
                 "--attention-blocks", "1", "--reductions", "0.3", "--out", str(tmp_path / "d")]) == 0
    numbers = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert numbers["data"] == f"{data} test, 4 inputs from #0 (stratified round-robin over classes, file order)"
    assert numbers["images"] == 4
    assert {"decay", "attention", "dependence", "order", "importance", "prune_vs_merge"} <= set(numbers)
    length = model.layout.length
    assert len(numbers["dependence"]["block 1 alone"]["distance"]) == length - 1
    summary = (tmp_path / "d" / "summary.txt").read_text()
    assert "nan" not in summary and "n/a" in summary  # no token 64 away (25 tokens) or left of a head class token
    for figure in ("decay", "attention", "dependence", "correlation", "prune_vs_merge"):
        assert decoded(tmp_path / "d" / f"{figure}.png").size[0] > 100
    assert main(["visualize", *common, "--images", "2", "--reduction", "0.5", "--out", str(tmp_path / "v")]) == 0
    assert "wrote merge_mame.png and merge_mame.json" in capsys.readouterr().out
    picture = decoded(tmp_path / "v" / "merge_mame.png")
    groups = json.loads((tmp_path / "v" / "merge_mame.json").read_text())
    assert groups["layout"]["grid"] == list(model.layout.grid) and groups["steps"]
    for step in groups["steps"]:
        ids = torch.tensor(step["groups"])
        assert ids.shape == (2, model.layout.num_patches) and (ids >= 0).all()  # merging: every patch in a group
        assert [len(row.unique()) for row in ids] == [step["tokens"] - 1] * 2
    assert min(picture.size) > 100


def test_data_that_does_not_fit_the_checkpoint_is_a_clear_error(tmp_path, capsys):
    audio = mambamerge.save_checkpoint(tiny_aum(), tmp_path / "aum.safetensors")
    video = mambamerge.save_checkpoint(tiny_videomamba(), tmp_path / "video.safetensors")
    torch.manual_seed(0)
    image = mambamerge.save_checkpoint(mambamerge.create_model("vim_pico", in_chans=1, depth=2, num_classes=10),
                                       tmp_path / "vim.safetensors")
    cases = [
        (["visualize", "--checkpoint", str(image), "--data", "fsdd", "--reduction", "0.3"],
         "the model (vim) takes 1x32x32 images but fsdd test gives spectrograms of 128 frames x 128 mel bins"),
        (["diagnose", "--checkpoint", str(audio), "--data", "moving-fashion-mnist", "--reductions", "0.2"],
         "the model (aum) takes spectrograms of 32 frames x 128 mel bins but moving-fashion-mnist test gives clips"),
        (["visualize", "--checkpoint", str(video), "--data", "fsdd"],
         "the model (videomamba) takes clips of 8 frames of 1x32x32 but fsdd test gives spectrograms"),
        (["diagnose", "--checkpoint", str(audio), "--data", "fsdd", "--first", "300", "--reductions", "0.2"],
         "fsdd test holds no inputs from input 300 on"),
        (["visualize", "--checkpoint", str(audio), "--data", str(tmp_path)],
         "--split applies to the named data sets"),
    ]
    for argv, message in cases:
        out = ["--out", str(tmp_path / "out")]
        assert main([*argv, "--split", "test", "--images", "2", "--threads", "1", *out]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder
