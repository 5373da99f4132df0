"""Accuracy and throughput of a model on a dataset."""
import statistics
from typing import Dict, Optional, Sequence, Tuple

import torch

from mambamerge.data import batches, unreadable
from mambamerge.data.loading import subset
from mambamerge.devices import autocast
from mambamerge.distributed import shard, sum_all, union_all, world
from mambamerge.flops import flops
from mambamerge.patch import patch, reduction_summary, unpatch
from mambamerge.progress import progress as bar
from mambamerge.timing import first_call_seconds, time_call, time_interleaved


def accuracy(model, dataset, batch_size: int = 256, progress: Optional[str] = None, amp: str = "none",
             workers: int = 0) -> float:
    """Top-1 accuracy of `model` on `dataset`; see top_k_accuracy."""
    return top_k_accuracy(model, dataset, (1,), batch_size, progress, amp, workers)[1]


def top_k_accuracy(model, dataset, ks: Sequence[int] = (1, 5), batch_size: int = 256, progress: Optional[str] = None,
                   amp: str = "none", workers: int = 0) -> Dict[int, Optional[float]]:
    """{k: fraction of inputs whose label is among the model's k highest logits} of `model` (dense or
    patched, on the device of its parameters) on `dataset`; None for a k not below the number of
    classes (every label would count). The model is left in eval mode. amp: autocast ("none", "bf16",
    "fp16"); workers: DataLoader processes for folder data. Under torchrun each process evaluates its
    share and the counts are summed: every input counts exactly once."""
    model.eval()
    device = next(model.parameters()).device
    wanted, ks = list(ks), [k for k in ks if k < model.num_classes or k == 1]
    here = world()
    part = subset(dataset, shard(len(dataset), here)) if here.active else dataset
    correct, total = [0] * len(ks), 0
    steps = -(-len(part) // batch_size)
    loader = batches(part, batch_size, workers=workers, pin_memory=device.type == "cuda")
    with torch.inference_mode(), autocast(device, amp):
        for images, labels in bar(loader, total=steps, desc=progress, unit="batch", disable=progress is None):
            ranked = model(images.to(device, non_blocking=True)).topk(max(ks), dim=1).indices.cpu()
            hits = ranked == labels[:, None]
            for index, k in enumerate(ks):
                correct[index] += hits[:, :k].any(dim=1).sum().item()
            total += len(labels)
    *correct, total = sum_all([*correct, total], device)
    if getattr(dataset, "unreadable", None) is not None:
        union_all(dataset.unreadable)  # each process met the unreadable images of its own share
    if total == 0:
        raise ValueError("the dataset is empty")
    return {**dict.fromkeys(wanted), **{k: c / total for k, c in zip(ks, correct)}}


def check_fit(model, info, data_name: str = "the dataset") -> None:
    """Raise a ValueError naming both sides when `model` cannot be evaluated on a dataset (its info:
    classes, input_kind and input_shape, the shape of one sample): a model without a head, the kind of
    input (images, clips, spectrograms), the number of classes, then for images the channels and the
    size, for other inputs the sample shape."""
    want, got = tuple(model.input_shape), tuple(info.input_shape)
    same_kind = model.input_kind == info.input_kind
    if model.num_classes == 0:
        raise ValueError(f"the model has no classification head (num_classes=0: a feature extractor, its forward "
                         f"gives {model.num_features} features, not class scores): nothing to evaluate, train or distil "
                         f"from on {data_name}; use a checkpoint with a head")
    if same_kind and model.num_classes != info.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes but {data_name} has {info.num_classes}; "
                         f"evaluate it on data with {model.num_classes} classes (or fine-tune its head first)")
    if want == got:
        return
    if same_kind and model.input_kind == "images":
        if want[0] != got[0]:
            raise ValueError(f"the model takes {want[0]}-channel images but {data_name} gives {got[0]}-channel "
                             f"ones; use data with {want[0]} channels")
        raise ValueError(f"the model runs at {want[1]}x{want[2]} but {data_name} is loaded at {got[1]}x{got[2]}; load "
                         f"the data at the model's size or build the model for the data's "
                         f"(load_checkpoint(img_size=...))")
    raise ValueError(f"the model ({model.family}) takes {describe_input(model.input_kind, want)} but {data_name} "
                     f"gives {describe_input(info.input_kind, got)}; load the data for this model (its input_shape) or "
                     f"pick a model built for the data")


def describe_input(kind: str, shape) -> str:
    """One input in words, from its kind and per-sample shape: (C, H, W) images, (C, T, H, W) clips,
    (T, F) spectrograms."""
    shape = tuple(shape)
    if kind == "images":
        return f"{shape[0]}x{shape[1]}x{shape[2]} images"
    if kind == "clips":
        return f"clips of {shape[1]} frames of {shape[0]}x{shape[2]}x{shape[3]}"
    if kind == "spectrograms":
        return f"spectrograms of {shape[0]} frames x {shape[1]} mel bins"
    return f"inputs of shape {shape}"


def check_classes(model, info, data_name: str = "the dataset") -> None:
    """A ValueError when the checkpoint records class names (model.classes) other than the dataset's:
    a model of another data set with the same number of classes would otherwise run and score chance."""
    classes = getattr(model, "classes", None)
    if classes is not None and list(classes) != list(info.classes):
        differ = sum(a != b for a, b in zip(classes, info.classes)) + abs(len(classes) - len(info.classes))
        raise ValueError(f"the model was trained on the classes {_names(classes)} but {data_name} has "
                         f"{_names(info.classes)} ({differ} differ); evaluate it on the data it was trained for "
                         f"(same class folders, same order)")


def _names(classes, shown: int = 5) -> str:
    head = ", ".join(repr(c) for c in list(classes)[:shown])
    return f"[{head}{', ...' if len(classes) > shown else ''}]"


def _random_inputs(model, batch_size: int) -> torch.Tensor:
    """(batch_size, *model.input_shape) standard-normal inputs on the model's device."""
    return torch.randn(batch_size, *model.input_shape, device=next(model.parameters()).device)


def _forward(model, compile: bool):
    """model, or its forward compiled by mambamerge.compiling.compile."""
    if not compile:
        return model
    from mambamerge.compiling import compile as compile_model

    return compile_model(model)


def throughput(model, batch_size: int = 8, runs: int = 5, warmup: int = 1, amp: str = "none",
               compile: bool = False) -> Tuple[float, Optional[Dict[str, float]]]:
    """(inputs per second, {"model": compile seconds} or None) of `model` (dense or patched, put in eval mode) on
    random inputs (batch_size, *model.input_shape) on its own device: median of `runs` timed forwards
    after `warmup` discarded ones (timing.time_call). compile: time the torch.compile'd forward; its
    first call, the compile, is timed apart and is not one of the runs."""
    images = _random_inputs(model, batch_size)
    model.eval()
    forward = _forward(model, compile)
    with torch.inference_mode(), autocast(images.device, amp):
        compile_s = first_call_seconds({"model": lambda: forward(images)}, images.device) if compile else None
        seconds = statistics.median(time_call(lambda: forward(images), images.device, warmup=warmup, runs=runs))
    return batch_size / seconds, compile_s


def paired_throughput(model, batch_size: int = 8, runs: int = 5, warmup: int = 1, amp: str = "none",
                      compile: bool = False) -> Tuple[float, float, Optional[Dict[str, float]]]:
    """(patched, dense) images per second of a patched `model` at its own image size, the two forwards
    timed round-robin in this process (timing.time_interleaved: medians of `runs`), so that load from
    other processes hits both alike and their ratio stays honest, and the compile seconds of each
    ({"patched": s, "dense": s}, their first calls, timed apart) with compile=True, else None. The
    model is left as given (its reducer and train / eval mode restored)."""
    reducer, training = model.token_reducer, model.training
    images = _random_inputs(model, batch_size)
    run = _forward(model, compile)

    def forward_with(token_reducer):
        def forward():
            model.token_reducer = token_reducer
            return run(images)
        return forward

    model.eval()
    fns = {"patched": forward_with(reducer), "dense": forward_with(None)}
    try:
        with torch.inference_mode(), autocast(images.device, amp):
            compile_s = first_call_seconds(fns, images.device) if compile else None
            seconds = time_interleaved(fns, images.device, warmup=warmup, runs=runs)
    finally:
        model.token_reducer = reducer
        model.train(training)
    return batch_size / seconds["patched"], batch_size / seconds["dense"], compile_s


def evaluate(model, dataset, method: Optional[str] = None, reduction: Optional[float] = None, batch_size: int = 256,
             throughput_batch: int = 8, runs: int = 5, warmup: int = 1, progress: Optional[str] = None,
             amp: str = "none", workers: int = 0, compile: bool = False, **patch_options) -> dict:
    """Evaluate `model` dense (method None) or patched with `method` at target average `reduction`
    (patch_options: schedule parameters and the method's own options, as for mambamerge.patch; with
    reduction None the schedule's size comes from them, e.g. r=).

    Returns plain numbers: method ("dense" when None), target_reduction, options, top1 and top5
    (fractions; top5 None with 5 classes or fewer), inputs (how many were scored) and input_kind
    (images, clips or spectrograms), average_reduction, average_tokens, final_tokens, initial_tokens,
    gmacs_* (multiply-accumulates per input, what the literature calls GFLOPs: one_direction (the scan
    branch counted once, the literature's convention) / both_directions, merge_overhead, total_* =
    model + overhead), inputs_per_s and dense_inputs_per_s (medians of `runs` forwards at
    throughput_batch; for a method the patched and dense forwards are interleaved, see
    paired_throughput), speedup (their ratio), throughput_batch, timing_runs, schedule (removals and
    token counts per block). amp: autocast for every forward ("none", "bf16", "fp16"); workers:
    DataLoader processes for folder data; compile: time torch.compile'd forwards (the accuracy pass
    stays eager), compile_s their compile seconds ({"patched", "dense"} or {"model"}), else None. Under
    torchrun the accuracy covers every input once (summed over processes); each process times its own
    forwards.
    A mismatch between model and data, or a configuration the method cannot reach, is a ValueError
    raised before any image is run. The model is left as given (its reducer and train / eval mode)."""
    check_fit(model, dataset.info)
    check_classes(model, dataset.info)
    if method is None and (reduction or patch_options):
        raise ValueError("a reduction or patch options need a method; pass method='mame' (or another one)")
    given, training = model.token_reducer, model.training
    unpatch(model)
    try:
        if method is not None:
            patch(model, method, reduction=reduction, **patch_options)
        summary = reduction_summary(model)
        macs = flops(model).summary()
        top = top_k_accuracy(model, dataset, (1, 5), batch_size, progress, amp=amp, workers=workers)
        if method is None:
            per_s, compile_s = throughput(model, throughput_batch, runs, warmup, amp, compile)
            dense_per_s = per_s
        else:
            per_s, dense_per_s, compile_s = paired_throughput(model, throughput_batch, runs, warmup, amp, compile)
    finally:
        model.token_reducer = given
        model.train(training)
    return {
        "method": method or "dense", "target_reduction": reduction or 0.0, "options": dict(patch_options),
        "top1": top[1], "top5": top[5], "inputs": len(dataset) - len(unreadable(dataset)),
        "input_kind": model.input_kind, "unreadable_images": unreadable(dataset),
        "average_reduction": summary["average_reduction"], "average_tokens": summary["average_tokens"],
        "final_tokens": summary["final_tokens"], "initial_tokens": summary["initial_tokens"],
        **{f"gmacs_{key}": macs[key] for key in ("one_direction", "both_directions", "merge_overhead",
                                                 "total_one_direction", "total_both_directions")},
        "inputs_per_s": per_s, "dense_inputs_per_s": dense_per_s,
        "speedup": per_s / dense_per_s, "throughput_batch": throughput_batch, "timing_runs": runs,
        "compiled": compile, "compile_s": compile_s,
        "schedule": {"removals": summary["removals"], "token_counts": summary["token_counts"]},
    }
