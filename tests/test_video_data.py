"""Video front end and datasets: PyAV files and frame folders, frame sampling, clip transform, and the
generated moving Fashion-MNIST task (deterministic, labels = class x direction, paths on the canvas)."""
import av
import numpy as np
import pytest
import torch
from PIL import Image

from mambamerge.data import batches, load_dataset, stratified
from mambamerge.data.video import clip_tensor, read_frame_folder, read_video, segment_middles
from mambamerge.data.video_sets import DIRECTIONS, MovingItems


def moving_square(frames, height=48, width=64, step=4):
    """RGB frames (T, H, W, 3): a white 16x16 square moving `step` pixels right a frame."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        video[t, 16:32, step * t:step * t + 16] = 255
    return video


def write_video(path, video, codec="mpeg4"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def square_left_edges(video):
    return [int(np.argmax(frame[24, :, 0] > 128)) for frame in video]


def test_segment_middles():
    assert segment_middles(12, 4) == [1, 4, 7, 10]
    assert segment_middles(8, 8) == list(range(8))
    with pytest.raises(ValueError, match="clip.mp4 has 3 frames but the model takes 8"):
        segment_middles(3, 8, "clip.mp4")


def test_read_video_samples_segment_middles(tmp_path):
    write_video(tmp_path / "clip.mp4", moving_square(12))
    video = read_video(tmp_path / "clip.mp4", 4)
    assert video.shape == (4, 48, 64, 3) and video.dtype == np.uint8
    assert square_left_edges(video) == [4, 16, 28, 40]  # frames 1, 4, 7, 10
    write_video(tmp_path / "short.mp4", moving_square(3))
    with pytest.raises(ValueError, match=r"short.mp4 has 3 frames but the model takes 8; use clips of at least 8"):
        read_video(tmp_path / "short.mp4", 8)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(ValueError, match="broken.mp4: cannot be decoded as a video"):
        read_video(tmp_path / "broken.mp4", 4)


def test_frame_folders(tmp_path):
    for t, frame in enumerate(moving_square(10)):
        Image.fromarray(frame).save(tmp_path / f"frame_{t:03d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    video = read_frame_folder(tmp_path, 5)
    assert np.array_equal(video, moving_square(10)[[1, 3, 5, 7, 9]])
    with pytest.raises(ValueError, match="has 10 frames but the model takes 16"):
        read_frame_folder(tmp_path, 16)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "frame_999.png")
    with pytest.raises(ValueError, match="its frames differ in size"):
        read_frame_folder(tmp_path, 11)


def test_clip_tensor_resizes_the_short_side_and_centre_crops():
    frames = np.zeros((2, 20, 40, 3), dtype=np.uint8)
    frames[:, :, 6:34] = 255  # white but for the outer 6 columns of each side, which the crop drops
    clip = clip_tensor(frames, 10, in_chans=3)
    assert clip.shape == (3, 2, 10, 10)
    white = (torch.ones(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(clip, white.view(3, 1, 1, 1).expand_as(clip), atol=1e-5)
    grey = clip_tensor(frames, 10, in_chans=1)
    assert grey.shape == (1, 2, 10, 10) and torch.allclose(grey, torch.ones_like(grey), atol=1e-5)
    with pytest.raises(ValueError, match="RGB .* or grey"):
        clip_tensor(frames, 10, in_chans=2)


def test_video_folders_mix_files_and_frame_folders(tmp_path):
    (tmp_path / "left").mkdir()
    write_video(tmp_path / "left" / "a.mp4", np.ascontiguousarray(moving_square(9)[:, :, ::-1]))
    (tmp_path / "right" / "b").mkdir(parents=True)
    for t, frame in enumerate(moving_square(9)):
        Image.fromarray(frame).save(tmp_path / "right" / "b" / f"{t}.png")
    ds = load_dataset(str(tmp_path), input_shape=(1, 4, 16, 16), input_kind="clips")
    assert ds.info.classes == ["left", "right"] and ds.info.input_shape == (1, 4, 16, 16) and len(ds) == 2
    x, y = next(batches(ds, 2))
    assert x.shape == (2, 1, 4, 16, 16) and y.tolist() == [0, 1]
    (tmp_path / "empty" / "none").mkdir(parents=True)
    with pytest.raises(ValueError, match="no video files or frame folders"):
        load_dataset(str(tmp_path / "empty"), input_shape=(3, 4, 16, 16), input_kind="clips")


def item_centres(clips):
    """clips (B, 1, T, S, S) -> centres of mass (B, T, 2) = (row, column) of the bright pixels."""
    weights = (clips[:, 0] + 1) / 2  # back to [0, 1]
    size = clips.shape[-1]
    grid = torch.arange(size, dtype=torch.float32)
    mass = weights.sum((-1, -2))
    return torch.stack([(weights.sum(-1) * grid).sum(-1) / mass, (weights.sum(-2) * grid).sum(-1) / mass], -1)


def test_moving_items_show_the_labelled_class_and_direction():
    ds = load_dataset("moving-fashion-mnist", "test", limit=400)
    assert ds.info.num_classes == 40 and ds.info.input_shape == (1, 8, 32, 32)
    assert ds.info.classes[:5] == ["T-shirt/top, right", "T-shirt/top, left", "T-shirt/top, down", "T-shirt/top, up",
                                   "Trouser, right"]
    clips, labels = ds.batch(range(400))
    assert labels.tolist() == list(range(40)) * 10  # a limit: round-robin over the 40 classes
    full = load_dataset("moving-fashion-mnist", "test")  # ... of the clips the whole split shows
    kept = torch.tensor(stratified(full.labels.tolist(), 400))
    assert torch.equal(clips, full.batch(kept)[0]) and torch.equal(labels // 4, full.item_labels[kept])
    # the item is whole in every frame: same brightness sum as the shrunk item
    sums = ((clips[:, 0] + 1) / 2).sum((-1, -2))
    assert torch.allclose(sums, ds.items.sum((-1, -2))[:, None].expand_as(sums), rtol=1e-5)
    moves = item_centres(clips).diff(dim=1)  # (B, T - 1, 2)
    expected = {"right": (0, 2), "left": (0, -2), "down": (2, 0), "up": (-2, 0)}
    for i, label in enumerate(labels.tolist()):
        step = torch.tensor(expected[DIRECTIONS[label % 4]], dtype=torch.float32)
        assert torch.allclose(moves[i], step.expand_as(moves[i]), atol=1e-4)


def test_moving_items_are_deterministic_and_augmentation_redraws():
    a, b = (load_dataset("moving-fashion-mnist", "test", limit=64) for _ in range(2))
    assert torch.equal(a.batch(range(64))[0], b.batch(range(64))[0])
    assert not torch.equal(a.starts, MovingItems("fashion-mnist", "test", seed=1, limit=64).starts)
    stream = load_dataset("moving-fashion-mnist", "test", limit=64, augment=True)
    gen = torch.Generator().manual_seed(0)
    first, second = stream.batch(range(64), gen), stream.batch(range(64), gen)
    assert torch.equal(first[1] // 4, second[1] // 4) and not torch.equal(first[0], second[0])
    with pytest.raises(ValueError, match="moving-fashion-mnist splits are train, val, test"):
        load_dataset("moving-fashion-mnist", "dev")
