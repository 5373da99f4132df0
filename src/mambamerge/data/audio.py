"""Audio front end of Audio Mamba: sound files to normalised Kaldi log-mel filterbank features.

- Reading: soundfile (libsndfile: wav, flac, ogg, ...), samples as floats in [-1, 1]; only the
  start of the file that the model's frames cover (frames x 10 ms + the 15 ms rest of the last
  window), at 1 to 384 kHz and 1 to 64 channels.
- Conversion (documented, not an error): several channels are averaged to mono; any other sample rate
  is resampled to 16 kHz with soxr (libsoxr, "high quality" preset).
- Features: kaldi-native-fbank with the settings of AuM / AST (torchaudio's Kaldi fbank with
  htk_compat, hanning window, no dither, no energy): 128 mel bins, 25 ms frames every 10 ms, on the
  waveform less its mean (the mean of the samples read). A clip of N samples gives 1 + (N - 400) // 160 frames (snip_edges).
- Fixed length: features are cut or zero-padded at the end to a fixed number of frames (AST's
  convention: the padding is 0 in log-mel, before normalisation).
- Normalisation: (fbank - mean) / (2 * std) with AudioSet's statistics of these features, the
  constants the official AuM (and AST) checkpoints were trained with.
"""
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974
RATES = (1000, 384000)  # sample rates accepted (Hz)
MAX_CHANNELS = 64
BLOCK_FRAMES = 65536  # frames read at a time (averaged to mono before the next block)


def read_audio(path, sample_rate: int = SAMPLE_RATE, max_samples: Optional[int] = None) -> np.ndarray:
    """Mono float32 samples (N,) of a sound file at `sample_rate`: channels averaged, other rates
    resampled (soxr); with `max_samples`, only the start of the file that gives that many samples is
    read (memory and time do not grow with the file). Unreadable or empty files, sample rates outside
    RATES, more than MAX_CHANNELS channels and non-finite samples are ValueErrors naming the file."""
    import soundfile
    import soxr

    path = Path(path)
    try:
        with open(path, "rb") as file, soundfile.SoundFile(file) as sound:
            rate, channels = sound.samplerate, sound.channels
            check_layout(path, rate, channels)
            wanted = -1 if max_samples is None else math.ceil(max_samples * rate / sample_rate) + rate // 50
            blocks = [block.mean(axis=1, dtype=np.float32) for block in
                      sound.blocks(blocksize=BLOCK_FRAMES, frames=wanted, dtype="float32", always_2d=True)]
    except (soundfile.LibsndfileError, RuntimeError, TypeError, OSError) as err:
        raise ValueError(f"{path}: cannot be read as a sound file ({err}); supported formats: "
                         f"{', '.join(sorted(soundfile.available_formats()))}") from None
    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if mono.shape[0] == 0:
        raise ValueError(f"{path}: holds no samples")
    if not np.isfinite(mono).all():
        raise ValueError(f"{path}: holds non-finite samples (inf or NaN); sound files must hold finite samples")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return mono if max_samples is None else mono[:max_samples]


def check_layout(path, rate: int, channels: int) -> None:
    """A ValueError naming the file when its header's sample rate or channel count is outside the
    bounds (a 16 KB file claiming 1 Hz would be resampled to gigabytes)."""
    if not RATES[0] <= rate <= RATES[1]:
        raise ValueError(f"{path}: its header says {rate} Hz; sound files must be sampled at {RATES[0]:,} to "
                         f"{RATES[1]:,} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"{path}: its header says {channels} channels; sound files may have 1 to {MAX_CHANNELS}")


def clip_samples(frames: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples at `sample_rate` that `frames` feature frames cover: (frames - 1) shifts and one window."""
    return (frames - 1) * int(sample_rate * FRAME_SHIFT_MS / 1000) + int(sample_rate * FRAME_LENGTH_MS / 1000)


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
    cut or padded to `frames`, normalised. Only the samples those frames cover are read."""
    waveform = read_audio(path, max_samples=clip_samples(frames))
    try:
        features = fbank(waveform, SAMPLE_RATE, num_bins)
    except ValueError as err:
        raise ValueError(f"{path}: too short for one feature frame: {err}") from None
    return normalise(fix_frames(features, frames))
