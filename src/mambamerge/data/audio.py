"""Audio front end of Audio Mamba: sound files to normalised Kaldi log-mel filterbank features.

- Reading: soundfile (libsndfile: wav, flac, ogg, ...), samples as floats in [-1, 1].
- Conversion (documented, not an error): several channels are averaged to mono; any other sample rate
  is resampled to 16 kHz with soxr (libsoxr, "high quality" preset).
- Features: kaldi-native-fbank with the settings of AuM / AST (torchaudio's Kaldi fbank with
  htk_compat, hanning window, no dither, no energy): 128 mel bins, 25 ms frames every 10 ms, on the
  waveform less its mean. A clip of N samples gives 1 + (N - 400) // 160 frames (snip_edges).
- Fixed length: features are cut or zero-padded at the end to a fixed number of frames (AST's
  convention: the padding is 0 in log-mel, before normalisation).
- Normalisation: (fbank - mean) / (2 * std) with AudioSet's statistics of these features, the
  constants the official AuM (and AST) checkpoints were trained with.
"""
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974


def read_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples (N,) of a sound file at `sample_rate`: channels averaged, other rates
    resampled (soxr). Unreadable or empty files are ValueErrors naming the file."""
    import soundfile
    import soxr

    path = Path(path)
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"{path}: cannot be read as a sound file ({err}); supported formats: "
                         f"{', '.join(sorted(soundfile.available_formats()))}") from None
    if samples.shape[0] == 0:
        raise ValueError(f"{path}: holds no samples")
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return mono


def fbank(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, num_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Log-mel filterbank (frames, num_bins) of mono samples (N,) in [-1, 1] at `sample_rate`, with the
    settings listed in the module docstring. Fewer samples than one 25 ms frame is a ValueError."""
    import kaldi_native_fbank as knf

    frame_length = int(sample_rate * FRAME_LENGTH_MS / 1000)
    if waveform.ndim != 1 or waveform.shape[0] < frame_length:
        raise ValueError(f"need a mono waveform of at least {frame_length} samples ({FRAME_LENGTH_MS:g} ms at "
                         f"{sample_rate} Hz), got shape {tuple(waveform.shape)}")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = num_bins
    opts.use_energy = False
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(sample_rate, (waveform - waveform.mean()).astype(np.float32))
    computer.input_finished()
    return torch.from_numpy(np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)]))


def fix_frames(features: torch.Tensor, frames: int) -> torch.Tensor:
    """features (T, F) -> (frames, F): the first `frames` frames, zero-padded at the end if T < frames."""
    if features.shape[0] >= frames:
        return features[:frames]
    return torch.nn.functional.pad(features, (0, 0, 0, frames - features.shape[0]))


def normalise(features: torch.Tensor) -> torch.Tensor:
    """AuM's input normalisation: (fbank - mean) / (2 * std), AudioSet statistics."""
    return (features - FBANK_MEAN) / (2 * FBANK_STD)


def audio_features(path, frames: int, num_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """A sound file as the model input (frames, num_bins): read, converted to 16 kHz mono, fbank,
    cut or padded to `frames`, normalised."""
    waveform = read_audio(path)
    try:
        features = fbank(waveform, SAMPLE_RATE, num_bins)
    except ValueError as err:
        raise ValueError(f"{path}: too short for one feature frame: {err}") from None
    return normalise(fix_frames(features, frames))
