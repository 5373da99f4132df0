"""Hostile data files (issue 16, items 4-6, 10, 12 and 15) and the `--limit` subset (issue 17, item 1):
every size is bounded from the header before anything is allocated, folder walks end, errors raised in
DataLoader workers read as the one-line message they are without workers, augmentation failures are
not unreadable images, and a limit reaches every class. The hostile files are made here, each a few KB.

Memory tests run the command in a subprocess whose address space is capped (RLIMIT_AS) at what it has
mapped after importing everything, plus HEADROOM: the old readers needed 1.7 GB (a 72 KB clip), 3.1 GB
(a 16 KB WAV) or failed outright (a 300-byte PNG) there."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageOps

import mambamerge
from mambamerge.cli.main import main
from mambamerge.data import batches, load_dataset, stratified
from mambamerge.data.audio import clip_samples, read_audio
from mambamerge.data.folders import ReadableImages
from mambamerge.train_settings import Augment
from mambamerge.data.loading import limited

HEADROOM = 1 << 30
CAPPED = textwrap.dedent("""
    import resource, sys
    import av, soundfile, soxr, torch, torchvision, timm
    from mambamerge.cli.main import main
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    mapped = int(status["VmSize"].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), resource.RLIM_INFINITY))
    sys.exit(main(sys.argv[2:]))
""")


def capped(argv, timeout=240):
    """(exit code, stderr) of `mambamerge argv` in a subprocess capped at HEADROOM more memory than its
    imports map, killed after `timeout` seconds (a hang is a failure, not a stuck test run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CAPPED, str(HEADROOM), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return done.returncode, done.stderr


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def still_clip(path, frames, height, width, codec="libx264"):
    """A black clip of `frames` frames: one encoded key frame, then copies of one encoded 'no change'
    frame (a 1200-frame 720p clip is 72 KB and takes a fraction of a second to write)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        packets = []
        for pts in range(2):
            black.pts = pts
            packets += stream.encode(black)
        packets += stream.encode()
        container.mux(packets[0])
        for pts in range(1, frames):
            packet = av.Packet(bytes(packets[1]))
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, pts, pts, packets[1].time_base
            container.mux(packet)
    return path


def moving_clip(path, frames, size=32):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * t, np.uint8),
                                                                   format="rgb24")))
        container.mux(stream.encode())
    return path


def png_header(path, width, height):
    """A grey PNG claiming width x height pixels, with one row of pixel data: what Pillow reads before
    decoding is all there (60 bytes)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(1 + width))) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = mambamerge.create_model("videomamba_nano", embed_dim=16, depth=2, num_classes=2)
    return str(mambamerge.save_checkpoint(model, tmp_path_factory.mktemp("video") / "v.safetensors"))


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = mambamerge.create_model("aum_nano", embed_dim=16, depth=2, spec_size=(128, 32), num_classes=2)
    return str(mambamerge.save_checkpoint(model, tmp_path_factory.mktemp("audio") / "a.safetensors"))


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", num_classes=3)
    return str(mambamerge.save_checkpoint(model, tmp_path_factory.mktemp("image") / "i.safetensors"))


def evaluate(ckpt, data, *extra):
    return ["eval", "--checkpoint", ckpt, "--data", data, "--runs", "1", "--throughput-batch", "1", "--threads", "1",
            *extra]


def two_classes(root, make):
    """<root>/a/<a good clip>, <root>/b/<a good clip> and whatever `make(root / "b")` adds."""
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        moving_clip(root / name / "good.mp4", 8)
    return make(root / "b")


def tone(path, seconds=1.0, rate=16000, channels=1, subtype="PCM_16"):
    t = np.arange(int(seconds * rate)) / rate
    samples = np.repeat((0.3 * np.sin(2 * np.pi * 440 * t))[:, None], channels, 1).astype(np.float32)
    soundfile.write(path, samples, rate, subtype=subtype)
    return path


# --- audio: only the frames the model uses are read; rates, channels and samples bounded (items 4, 15) ---

def test_a_wav_claiming_1_hz_is_refused_by_name_not_resampled_to_gigabytes(tmp_path, audio_ckpt):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tone(tmp_path / name / "ok.wav")
    soundfile.write(tmp_path / "b" / "slow.wav", np.zeros(8000, np.float32), 1, subtype="PCM_16")  # 16 KB
    code, err = capped(evaluate(audio_ckpt, tmp_path))
    assert code == 2 and "slow.wav: its header says 1 Hz; sound files must be sampled at 1,000 to 384,000 Hz" in \
        one_line_error(err)


def test_a_long_many_channel_file_is_read_only_as_far_as_the_model_looks(tmp_path, audio_ckpt):
    """96 kHz, 8 channels, 10 minutes (1.7 GB as floats): read in full, it exceeds the cap."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tone(tmp_path / name / "ok.wav")
    with soundfile.SoundFile(tmp_path / "b" / "long.flac", "w", 96000, 8, subtype="PCM_16") as sound:
        block = np.zeros((96000 * 30, 8), np.float32)
        for _ in range(20):
            sound.write(block)
    assert (tmp_path / "b" / "long.flac").stat().st_size < 2_000_000
    code, err = capped(evaluate(audio_ckpt, tmp_path, "--workers", "0"))
    assert code == 0, err


def test_reading_the_start_gives_the_samples_of_reading_it_all(tmp_path):
    path = tone(tmp_path / "a.wav", seconds=3, rate=44100, channels=2)
    whole = read_audio(path)
    for frames in (8, 128):
        part = read_audio(path, max_samples=clip_samples(frames))
        assert len(part) == clip_samples(frames) == (frames - 1) * 160 + 400
        np.testing.assert_allclose(part, whole[:len(part)], atol=1e-6)


def test_samples_past_the_frames_used_are_never_read(tmp_path):
    """A float WAV whose samples after the first second are NaN: the 32 frames used cover 0.335 s."""
    samples = np.full(48000, np.nan, np.float32)
    samples[:16000] = 0.1 * np.sin(np.arange(16000) / 5)
    soundfile.write(tmp_path / "late.wav", samples, 16000, subtype="FLOAT")
    assert np.isfinite(read_audio(tmp_path / "late.wav", max_samples=clip_samples(32))).all()
    with pytest.raises(ValueError, match="late.wav: holds non-finite samples"):
        read_audio(tmp_path / "late.wav")


@pytest.mark.parametrize("make, message", [
    (lambda p: soundfile.write(p, np.array([0.0, np.inf] * 4000, np.float32), 16000, subtype="FLOAT"),
     "holds non-finite samples (inf or NaN)"),
    (lambda p: soundfile.write(p, np.zeros(800, np.float32), 500), "its header says 500 Hz"),
    (lambda p: soundfile.write(p, np.zeros((400, 1), np.float32), 400000), "its header says 400000 Hz"),
    (lambda p: soundfile.write(p, np.zeros((400, 65), np.float32), 16000), "its header says 65 channels; sound "
                                                                             "files may have 1 to 64"),
])
def test_bad_sound_files_are_refused_by_name(tmp_path, audio_ckpt, capsys, make, message):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tone(tmp_path / name / "ok.wav")
    make(tmp_path / "b" / "bad.wav")
    assert main(evaluate(audio_ckpt, str(tmp_path))) == 2
    assert f"bad.wav: {message}" in one_line_error(capsys.readouterr().err)


def test_names_that_are_not_utf8_work_for_sound_files_and_clips(tmp_path, audio_ckpt, video_ckpt, capsys):
    root = os.fsencode(tmp_path)
    for name in (b"caf\xe9", b"plain"):  # written under plain names, then renamed (the writers fail as the readers did)
        os.makedirs(os.path.join(root, b"audio", name))
        os.rename(tone(tmp_path / "t.wav"), os.path.join(root, b"audio", name, b"\xff\xfe.wav"))
        os.makedirs(os.path.join(root, b"video", name))
        os.rename(moving_clip(tmp_path / "c.mp4", 8), os.path.join(root, b"video", name, b"clip\xe9.mp4"))
    assert main(evaluate(audio_ckpt, str(tmp_path / "audio"), "--json", str(tmp_path / "a.json"))) == 0
    assert main(evaluate(video_ckpt, str(tmp_path / "video"), "--workers", "0")) == 0
    assert json.loads((tmp_path / "a.json").read_text())["result"]["inputs"] == 2
    assert "error" not in capsys.readouterr().err


# --- video: streamed, only the chosen frames kept, frames bounded; worker errors in one line (items 5, 10) ---

def test_a_long_720p_clip_is_decoded_as_a_stream(tmp_path, video_ckpt):
    """1200 frames of 1280x720 in 72 KB: all decoded at once they take 1.7 GB."""
    two_classes(tmp_path, lambda folder: still_clip(folder / "long.mp4", 1200, 720, 1280))
    assert (tmp_path / "b" / "long.mp4").stat().st_size < 100_000
    code, err = capped(evaluate(video_ckpt, tmp_path, "--workers", "0"))
    assert code == 0, err


def test_a_4k_clip_is_read_within_the_bound_and_a_too_thin_one_is_named(tmp_path, video_ckpt):
    two_classes(tmp_path / "4k", lambda folder: still_clip(folder / "4k.mp4", 8, 2160, 3840))
    code, err = capped(evaluate(video_ckpt, tmp_path / "4k", "--workers", "0"))
    assert code == 0, err
    two_classes(tmp_path / "thin", lambda folder: still_clip(folder / "thin.mp4", 8, 32, 2048))
    code, err = capped(evaluate(video_ckpt, tmp_path / "thin", "--workers", "0"))
    assert code == 2 and "thin.mp4: 2048x32 has sides in ratio 64:1; inputs may be at most 32:1" in one_line_error(err)


def _frames(folder, shapes, suffix=".png"):
    folder.mkdir()
    for i, shape in enumerate(shapes):
        Image.fromarray(np.full((*shape, 3), 10 * i, np.uint8)).save(folder / f"{i:02d}{suffix}")
    return folder


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


BAD_CLIPS = {
    "corrupt": (lambda b: (b / "x.mp4").write_bytes(np.random.default_rng(0).bytes(2000)),
                "x.mp4: cannot be decoded as a video"),
    "empty": (lambda b: (b / "x.mp4").write_bytes(b""), "x.mp4: is empty (0 bytes)"),
    "truncated": (lambda b: _cut(moving_clip(b / "x.mp4", 12)), "x.mp4: holds no video stream"),
    "audio only": (lambda b: _audio_only(b / "x.mp4"), "x.mp4: holds no video stream (audio only"),
    "3 frames": (lambda b: moving_clip(b / "x.mp4", 3), "x.mp4 has 3 frames but the model takes 8"),
    "1 frame folder": (lambda b: _frames(b / "x", [(32, 32)]), "x has 1 frames but the model takes 8"),
    "sizes differ": (lambda b: _frames(b / "x", [(32, 32)] * 3 + [(36, 32)] + [(32, 32)] * 4),
                     "x: its frames differ in size"),
    "truncated jpeg": (lambda b: _cut(sorted(_frames(b / "x", [(32, 32)] * 8, ".jpg").iterdir())[0]),
                       "00.jpg: cannot be read as an image"),
    "20000x20000 frame": (lambda b: png_header(sorted(_frames(b / "x", [(32, 32)] * 8).iterdir())[4], 20000, 20000),
                          "04.png: Image size (400000000 pixels) exceeds limit"),
}


@pytest.mark.parametrize("case", BAD_CLIPS)
def test_a_bad_clip_is_the_same_one_line_error_with_and_without_workers(tmp_path, video_ckpt, capsys, case):
    make, message = BAD_CLIPS[case]
    two_classes(tmp_path, make)
    errors = []
    for workers in ([], ["--workers", "2"], ["--workers", "0"]):
        assert main(evaluate(video_ckpt, str(tmp_path), *workers)) == 2
        errors.append(one_line_error(capsys.readouterr().err))
    assert errors[0] == errors[1] == errors[2] and message in errors[0], errors


# --- image folders: walks end, only regular files, sides bounded before decoding (item 6) ---

def image_classes(root, classes=("a", "b", "c"), per_class=2, size=(36, 36)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((*size, 3), 40 * c + 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_links_to_folders_are_not_followed(tmp_path, image_ckpt):
    root = image_classes(tmp_path / "data")
    os.symlink(".", root / "a" / "loop")
    os.symlink("..", root / "a" / "up")
    (root / "b" / "more").mkdir()
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(root / "b" / "more" / "deep.png")
    with pytest.warns(UserWarning, match="2 links to folders not followed"):
        ds = load_dataset(str(root), img_size=32)
    assert len(ds) == 7 and sorted(p.name for p, _ in ds.samples) == ["0.png"] * 3 + ["1.png"] * 3 + ["deep.png"]
    code, err = capped(evaluate(image_ckpt, root, "--limit", "10"), timeout=120)
    assert code == 0 and "links to folders not followed" in err, err


def test_a_fifo_named_like_an_image_is_not_read(tmp_path, image_ckpt):
    root = image_classes(tmp_path / "data")
    os.mkfifo(root / "a" / "x.png")
    os.symlink("/dev/zero", root / "b" / "zero.png")
    assert len(load_dataset(str(root), img_size=32)) == 6
    code, err = capped(evaluate(image_ckpt, root), timeout=120)
    assert code == 0, err


def test_thin_and_huge_images_are_skipped_by_name_before_decoding(tmp_path, image_ckpt):
    root = image_classes(tmp_path / "data")
    Image.new("RGB", (200000, 1)).save(root / "a" / "thin.png")  # 275 bytes
    Image.new("L", (1, 2000000)).save(root / "b" / "tall.png")
    png_header(root / "c" / "huge.png", 20000, 20000)
    assert sum(p.stat().st_size for p in (root / "a" / "thin.png", root / "c" / "huge.png")) < 2000
    code, err = capped(evaluate(image_ckpt, root, "--json", tmp_path / "r.json"))
    assert code == 0 and "Traceback" not in err, err
    skipped = json.loads((tmp_path / "r.json").read_text())["result"]["unreadable_images"]
    assert [Path(s.split(" (")[0]).name for s in skipped] == ["thin.png", "tall.png", "huge.png"]
    assert "200000x1 has sides in ratio 200,000:1; inputs may be at most 32:1" in skipped[0]
    assert "Image size (400000000 pixels) exceeds limit" in skipped[2] and "at most 89,478,485 pixels" in skipped[2]


# --- augmentation (item 12) ---

def test_posterize_at_the_top_magnitude_keeps_one_bit_and_failures_are_not_unreadable_images():
    from timm.data import auto_augment

    transform = Augment(auto_augment="rand-m10-inc1").transform(32, (0.5,) * 3, (0.5,) * 3)
    op = next(op for step in transform.transforms for op in getattr(step, "ops", ()) if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="bits must be between"):  # what timm's own op does here
        auto_augment.posterize(image, *op.level_fn(op.magnitude, op.hparams))
    assert np.array_equal(np.asarray(op(image)), np.asarray(ImageOps.posterize(image, 1)))

    def broken(image):
        raise ValueError("an augmentation bug")

    ds = ReadableImages([(Path(__file__), 0)], broken, None)
    assert ds[0][0] is None  # not an image: unreadable
    png = Path(__file__).parent / "posterize_probe.png"
    try:
        image.save(png)
        with pytest.raises(ValueError, match="an augmentation bug"):
            ReadableImages([(png, 0)], broken, None)[0]
    finally:
        png.unlink()


# --- --limit: a stratified subset, the same for every run (issue 17, item 1) ---

def test_stratified_takes_classes_round_robin_in_file_order():
    labels = [0, 0, 0, 1, 1, 2, 0, 2]
    assert stratified(labels, 4) == [0, 3, 5, 1]
    assert stratified(labels, 7) == [0, 3, 5, 1, 4, 7, 2]
    assert stratified(labels, None) == stratified(labels, 8) == list(range(8))
    assert stratified(labels, 3, start=3) == [6, 3, 5]
    assert limited([7, 2, 5, 0], labels, 2) == [2, 7]  # labels 2, 0, 2, 0 there: class 0 first, then 2


def test_a_limit_on_a_class_ordered_folder_reaches_every_class(tmp_path, image_ckpt):
    root = image_classes(tmp_path / "images", per_class=4)
    ds = load_dataset(str(root), img_size=32, limit=3)
    assert [label for _, label in batches(ds, 3)][0].tolist() == [0, 1, 2]
    assert main(evaluate(image_ckpt, str(root), "--limit", "5", "--json", str(tmp_path / "e.json"))) == 0
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["limit"] == 5 and record["subset"] == "stratified round-robin over classes, file order"
    assert record["result"]["inputs"] == 5
    audio = tmp_path / "audio"
    for name in ("a", "b", "c"):
        (audio / name).mkdir(parents=True)
        for i in range(3):
            tone(audio / name / f"{i}.wav", seconds=0.5)
    assert load_dataset(str(audio), limit=3, input_shape=(32, 128), input_kind="spectrograms").labels.tolist() == [0, 1, 2]
    video = tmp_path / "video"
    for name in ("a", "b"):
        (video / name).mkdir(parents=True)
        for i in range(3):
            moving_clip(video / name / f"{i}.mp4", 8)
    assert [load_dataset(str(video), limit=2, input_shape=(1, 8, 32, 32), input_kind="clips")[i][1] for i in range(2)] == [0, 1]
    idx = load_dataset("fashion-mnist", "test", limit=20)
    assert idx.labels.tolist() == list(range(10)) * 2


def test_visualize_picks_its_inputs_from_every_class(tmp_path, image_ckpt):
    root = image_classes(tmp_path / "images", per_class=4, size=(32, 32))
    out = tmp_path / "vis"
    assert main(["visualize", "--checkpoint", image_ckpt, "--data", str(root), "--images", "3", "--reduction", "0.3", "--out", str(out),
                 "--threads", "1"]) == 0
    groups = json.loads((out / "merge_mame.json").read_text())
    assert groups["data"] == f"{root}, 3 inputs from #0 (stratified round-robin over classes, file order)"


def test_train_limit_takes_every_class(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        image_classes(root / split, per_class=6, size=(16, 16))
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--model", "vim_pico", "--epochs", "1", "--batch-size", "3",
                 "--eval-batch-size", "4", "--threads", "1", "--img-size", "16", "--limit", "3", "--val-split", "3",
                 "--workers", "0", "--out", str(out)]) == 0
    command = json.loads((out / "command.json").read_text())
    assert command["limit"] == 3 and command["subset"] == "stratified round-robin over classes, file order"
