"""Audio front end and datasets: Kaldi fbank against a slow NumPy reference, conversion of other rates
and channel counts, FSDD (shipped test clips and, where present, the full recordings in ../shared)."""
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from mambamerge.data import batches, load_dataset
from mambamerge.data.audio import FBANK_MEAN, FBANK_STD, audio_features, fbank, fix_frames, read_audio
from mambamerge.data.audio_sets import AudioClips, fsdd, shipped_fsdd

SHARED_FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd" / "recordings"
needs_shared_fsdd = pytest.mark.skipif(not SHARED_FSDD.is_dir(), reason="../shared/data/fsdd is not here")


def kaldi_fbank_reference(x, rate=16000, bins=128):
    """Kaldi's fbank written out in NumPy (float64), frame by frame: 25 ms frames every 10 ms
    (snip_edges), DC offset removed, pre-emphasis 0.97, hanning window, 512-point power spectrum,
    triangular filters equally spaced on mel = 1127 ln(1 + f / 700) from 20 Hz to Nyquist, log
    floored at float32 epsilon. The waveform's mean is removed first (AuM)."""
    length, shift, fft = int(rate * 0.025), int(rate * 0.010), 512
    x = x.astype(np.float64) - x.mean()
    frames = np.stack([x[i * shift:i * shift + length] for i in range(1 + (len(x) - length) // shift)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1)))
    power = np.abs(np.fft.rfft(frames, n=fft)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    low, high = mel(20.0), mel(rate / 2)
    delta = (high - low) / (bins + 1)
    fft_mel = mel(np.arange(fft // 2) * rate / fft)
    weights = np.zeros((bins, fft // 2))
    for b in range(bins):
        left, centre, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
        rising, falling = (fft_mel > left) & (fft_mel <= centre), (fft_mel > centre) & (fft_mel < right)
        weights[b, rising] = (fft_mel[rising] - left) / (centre - left)
        weights[b, falling] = (right - fft_mel[falling]) / (right - centre)
    return np.log(np.maximum(power[:, :fft // 2] @ weights.T, np.finfo(np.float32).eps))


def tone(freq, seconds, rate, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def dominant_frequency(x, rate):
    return np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x)


def test_fbank_matches_the_numpy_kaldi_reference():
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    x = (0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t) + 0.05 * rng.standard_normal(8000) + 0.2).astype(np.float32)
    features = fbank(x)
    assert features.shape == (1 + (8000 - 400) // 160, 128) and features.dtype == torch.float32
    np.testing.assert_allclose(features.numpy(), kaldi_fbank_reference(x), atol=2e-3)


def test_fbank_of_a_tone_peaks_at_its_mel_bin():
    features = fbank(tone(1000, 0.5, 16000))
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    centres = mel(20) + (np.arange(1, 129)) * (mel(8000) - mel(20)) / 129
    assert abs(int(features.mean(0).argmax()) - int(np.argmin(abs(centres - mel(1000))))) <= 1


def test_other_rates_and_channel_counts_are_converted(tmp_path):
    left, right = tone(440, 1.0, 8000), np.zeros(8000, dtype=np.float32)
    soundfile.write(tmp_path / "stereo8k.wav", np.stack([left, right], 1), 8000)
    mono = read_audio(tmp_path / "stereo8k.wav")
    assert mono.shape == (16000,) and mono.dtype == np.float32
    assert dominant_frequency(mono, 16000) == pytest.approx(440, abs=2)
    assert np.abs(mono[1000:-1000]).max() == pytest.approx(0.25, abs=0.01)  # averaged with a silent channel
    soundfile.write(tmp_path / "cd.flac", tone(3000, 0.5, 44100), 44100)
    resampled = read_audio(tmp_path / "cd.flac")
    assert resampled.shape == (8000,) and dominant_frequency(resampled, 16000) == pytest.approx(3000, abs=3)
    soundfile.write(tmp_path / "native.wav", tone(440, 0.5, 16000), 16000, subtype="FLOAT")
    assert np.array_equal(read_audio(tmp_path / "native.wav"), tone(440, 0.5, 16000))


def test_bad_sound_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.wav").write_text("not a sound file")
    with pytest.raises(ValueError, match="notes.wav: cannot be read as a sound file"):
        read_audio(tmp_path / "notes.wav")
    soundfile.write(tmp_path / "click.wav", tone(440, 0.01, 16000), 16000)
    with pytest.raises(ValueError, match=r"click.wav: too short for one feature frame.*400 samples"):
        audio_features(tmp_path / "click.wav", frames=96)
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav: holds no samples"):
        read_audio(tmp_path / "empty.wav")


def test_fixed_length_and_normalisation():
    features = torch.randn(50, 128)
    assert torch.equal(fix_frames(features, 30), features[:30])
    padded = fix_frames(features, 80)
    assert padded.shape == (80, 128) and torch.equal(padded[:50], features) and (padded[50:] == 0).all()
    clip = audio_features(shipped_fsdd() / "7_theo_0.flac", frames=96)
    expected = (fix_frames(fbank(read_audio(shipped_fsdd() / "7_theo_0.flac")), 96) - FBANK_MEAN) / (2 * FBANK_STD)
    assert clip.shape == (96, 128) and torch.equal(clip, expected)


def test_shipped_fsdd_test_split():
    ds = load_dataset("fsdd", "test")
    assert len(ds) == 300 and ds.info.num_classes == 10 and ds.info.input_shape == (128, 128)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [30] * 10
    assert ds.features.isfinite().all() and abs(ds.features.mean().item()) < 0.3
    x, y = next(batches(ds, 20))
    assert x.shape == (20, 128, 128) and y.tolist() == list(range(10)) * 2  # ordered take, speaker, digit
    short = load_dataset("fsdd", "test", limit=10, input_shape=(64, 128), input_kind="spectrograms")
    assert short.features.shape == (10, 64, 128) and torch.equal(short.features, ds.features[:10, :64])
    assert sum(p.stat().st_size for p in shipped_fsdd().iterdir()) < 1.5e6


def test_fsdd_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MAMBAMERGE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="fsdd:/path/to/recordings"):
        load_dataset("fsdd", "train")
    with pytest.raises(ValueError, match="FSDD splits are test, val, train"):
        load_dataset("fsdd", "dev")
    with pytest.raises(ValueError, match="no FSDD files of the val split"):
        load_dataset(f"fsdd:{shipped_fsdd()}", "val")


@needs_shared_fsdd
def test_shipped_clips_are_the_original_recordings():
    for shipped in sorted(shipped_fsdd().glob("*_4.flac")):
        original, rate = soundfile.read(SHARED_FSDD / (shipped.stem + ".wav"), dtype="int16")
        copy, copy_rate = soundfile.read(shipped, dtype="int16")
        assert rate == copy_rate == 8000 and np.array_equal(original, copy)


@needs_shared_fsdd
def test_real_8khz_recordings_are_resampled_to_16khz():
    path = SHARED_FSDD / "5_nicolas_20.wav"
    original, rate = soundfile.read(path, dtype="float32")
    waveform = read_audio(path)
    assert rate == 8000 and len(waveform) == 2 * len(original)
    # the same speech: spectra below 3.5 kHz agree after resampling
    spectrum = lambda x, r: np.abs(np.fft.rfft(x, n=r))[100:3500]  # noqa: E731  1 Hz bins
    np.testing.assert_allclose(spectrum(waveform, 16000) / 2, spectrum(original, 8000), rtol=0.05,
                               atol=0.05 * spectrum(original, 8000).max())
    val = load_dataset(f"fsdd:{SHARED_FSDD}", "val", limit=60)
    train = load_dataset(f"fsdd:{SHARED_FSDD}", "train", limit=60)
    assert {p.stem.rsplit("_", 1)[1] for p in val.files} == {"45"}
    assert {p.stem.rsplit("_", 1)[1] for p in train.files} == {"5"}


def test_masking_augmentation():
    clips = AudioClips([shipped_fsdd() / "1_george_0.flac"] * 8, [1] * 8, [str(d) for d in range(10)], 96,
                       augment=True)
    x, y = clips.batch(range(8), torch.Generator().manual_seed(0))
    zeroed = x == 0
    assert y.tolist() == [1] * 8 and zeroed.any()
    for original, masked, mask in zip(clips.features, x, zeroed):
        rows, columns = mask.all(1), mask.all(0)
        assert rows.sum() <= 16 and columns.sum() <= 24
        assert torch.equal(mask, rows[:, None] | columns[None, :])  # a span of frames and a band of bins
        assert torch.equal(masked[~mask], original[~mask])
    assert not torch.equal(x[0], x[1])
