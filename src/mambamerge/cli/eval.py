"""`mambamerge eval`: one checkpoint, one method, one reduction: top-1, top-5, GMACs and measured
throughput beside the dense model's. Also the argument handling and loading that `mambamerge sweep` shares."""
import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from mambamerge.cli.inputs import DataSpec
from mambamerge.cli.names import AMP_CHOICES, IDX_SETS, METHODS, VAL_SPLIT_SETS

if TYPE_CHECKING:
    import torch

    from mambamerge.merge.recipe import MergeRecipe

HELP = "evaluate a checkpoint with one token-reduction method: top-1, top-5, GMACs and measured throughput"
SCHEDULE_KEYS = ("schedule", "r", "keep", "start", "every")
EXAMPLES = ("--checkpoint vim_t_midclstok_76p1acc.pth --data imagenet/val --method mame --reduction 0.4",
            "--checkpoint model.safetensors --data fashion-mnist --limit 1000 --json eval.json",
            "--checkpoint model.safetensors --data fsdd --method tome --option schedule=constant --option r=4")


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments shared by eval and sweep: what to load and how to measure."""
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint (.safetensors or .pth)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="fashion-mnist or mnist (optionally NAME:/folder/with/idx/files), fsdd, moving-fashion-mnist, "
                        "moving-mnist, or a folder <folder>/<class name>/<inputs> of images, clips or sound files "
                        "(as the model takes)")
    p.add_argument("--split", help="train or test (default: test), also val for fsdd and moving-*; a folder is one "
                                   "split already")
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate on N inputs only: round-robin over the classes in file order (every class is "
                        "reached; the same N for every method and run)")
    p.add_argument("--img-size", type=int, metavar="PIXELS",
                   help="resolution to evaluate at (default: the checkpoint's training resolution, else 224)")
    p.add_argument("--batch-size", "--batch", type=int, default=64, metavar="N",
                   help="batch size of the accuracy pass (default: 64)")
    p.add_argument("--throughput-batch", type=int, default=8, help="batch size of the timed forwards (default: 8)")
    p.add_argument("--runs", type=int, default=5, help="timed forwards per throughput, median (default: 5)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free at start)")
    add_device_options(p)
    add_compile_option(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule parameter or method option, as for mambamerge.patch, e.g. --option every=1 "
                        "--option match=window; repeatable")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device, --amp and --workers, shared by every command that runs a model on data."""
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N; under torchrun, cuda gives each process its own GPU")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="autocast precision: none (default), bf16 (CPU or GPU), fp16 (GPU)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="DataLoader processes decoding image folders (default: "
                        "min(8, CPU cores per process - 1))")


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """--compile, shared by the commands that time forwards."""
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile'd forwards (mambamerge.compile; the accuracy pass stays eager); each "
                        "compile is timed apart from the runs, and inductor caches it for later runs")


def compile_line(compile_s: Dict[str, float]) -> str:
    """The report line of --compile: each forward's compile seconds and where torch caches the code."""
    from mambamerge.compiling import cache_dir

    times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in compile_s.items())
    return f"torch.compile (inductor), first calls not timed: {times}; cache {cache_dir()}"


def default_workers(requested: Optional[int]) -> int:
    """--workers, or min(8, this machine's cores per torchrun process - 1) when not given."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--workers must be 0 or more, got {requested}")
        return requested
    from mambamerge.distributed import world

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // world().local_size - 1))


def setup_device(args: argparse.Namespace) -> "torch.device":
    """The device of this process (joining torchrun's process group when there is one), with --amp
    checked against it."""
    from mambamerge import distributed
    from mambamerge.devices import check_amp, parse_device

    device = distributed.setup(parse_device(args.device))
    check_amp(args.amp, device)
    return device


def add_parser(p: argparse.ArgumentParser) -> None:
    add_common(p)
    add_method_options(p)
    add_config_option(p)
    p.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="a configuration `mambamerge tune` chose (DIR/config_<R>.json): its method, options and "
                        "per-block schedule")


def read_config(path: Optional[str]) -> Optional[dict]:
    """The tune configuration at --config (None when not given); a ValueError naming the file when it is
    missing or not JSON."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file (mambamerge tune writes DIR/config_<R>.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path} is not a tune configuration (JSON): {err}") from None


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """A ValueError naming the flag when one of the count arguments `names` was given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_common(args: argparse.Namespace) -> Dict[str, object]:
    """Validate the shared numbers; returns the parsed --option pairs."""
    check_at_least_one(args, "batch_size", "throughput_batch", "runs", "limit", "img_size", "threads")
    return parse_options(args.option)


def parse_options(pairs) -> Dict[str, object]:
    """--option KEY=VALUE pairs as a dict, values read as Python literals where they are ones."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE (e.g. every=1), got {pair!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def check_method(method: str, options: Dict[str, object]) -> None:
    """Unknown method names and options the method does not take are errors listing the valid ones; so
    are option values of the wrong kind and schedule parameters out of range (before any data is read)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    from mambamerge.patch import make_method

    from mambamerge.merge.schedule import check_arguments

    make_method(method, **{k: v for k, v in options.items() if k not in SCHEDULE_KEYS})
    check_arguments(**{k: options[k] for k in ("r", "keep", "start", "every") if k in options})


def add_method_options(p: argparse.ArgumentParser) -> None:
    """--method, --reduction and --option of eval and speed."""
    p.add_argument("--method", metavar="NAME",
                   help=f"token-reduction method: {', '.join(METHODS)}, or none for the dense model "
                        f"(default: the one a fine-tuned checkpoint records, else none)")
    p.add_argument("--reduction", type=float, metavar="R", help="target average reduction in [0, 1), e.g. 0.4")


def check_method_args(args: argparse.Namespace, options: Dict[str, object]) -> None:
    """--method (a name or none), --reduction and the --option pairs agree with each other."""
    if args.method in (None, "none") and (args.reduction is not None or options):
        raise ValueError("--reduction and --option need --method NAME")
    if args.method not in (None, "none"):
        check_method(args.method, options)
        if args.reduction is None and "r" not in options and "keep" not in options \
                and not isinstance(options.get("schedule"), (list, tuple)):
            raise ValueError("--method needs --reduction R (e.g. 0.4), --option r=N (N tokens before every block, "
                             "as ToMe), --option keep=K or --option schedule=[per-block counts]")
    if args.reduction is not None:
        check_reduction(args.reduction)


def recorded_merge(model, checkpoint: str, command: str, doing: str,
                   schedule: bool = True) -> Optional["MergeRecipe"]:
    """The token reduction `checkpoint` records (it was fine-tuned with it), announced on stderr with
    `doing` (what the command does with it, and how to do otherwise); None when it records none.
    schedule: its per-block schedule will run, so it is first checked to fit `model`."""
    from mambamerge.distributed import world

    recipe = getattr(model, "merge_recipe", None)
    if recipe is None:
        return None
    if schedule:
        recipe.check_fits(model)
    if world().is_main:
        print(f"mambamerge {command}: {Path(checkpoint).name} was fine-tuned with {recipe.describe()}; {doing}",
              file=sys.stderr)
    return recipe


def check_reduction(reduction: float) -> None:
    if not 0.0 <= reduction < 1.0:
        raise ValueError(f"reductions must be in [0, 1) (fraction of token-layers removed), got {reduction}")


def load_inputs(args: argparse.Namespace) -> Tuple["torch.nn.Module", object, str]:
    """(model on --device, dataset, data label) from --checkpoint, --data, --split (default test), --limit,
    --img-size, with torch set to --threads; see open_data."""
    import torch

    from mambamerge.threads import default_threads

    torch.set_num_threads(default_threads(args.threads))
    device = setup_device(args)
    model, dataset, label = open_data(args, default_split="test", limit=args.limit)
    return model.to(device), dataset, label


def open_data(args: argparse.Namespace, default_split: str, limit: Optional[int],
              start: int = 0, check: Optional[Callable[["torch.nn.Module"], None]] = None,
              suggest_test: bool = True) -> Tuple["torch.nn.Module", object, str]:
    """(model on the CPU, dataset of `limit` of its inputs from `start` on (load_dataset), data label)
    from --checkpoint, --data,
    --split and --img-size, for any family: images, clips or spectrograms, as the model's input_shape says.
    Every way they do not fit each other is a ValueError naming both sides. check: called with the
    model before any data is read (to refuse settings the model cannot run before any work). suggest_test:
    a missing split's error points to the shipped test split."""
    from mambamerge.checkpoint import load_checkpoint
    from mambamerge.data import load_dataset
    from mambamerge.devices import parse_device
    from mambamerge.evaluate import check_classes, check_fit
    from mambamerge.memory import check_side, check_size_args

    data = DataSpec.parse(args.data)
    named = data.named
    if args.split and not named:
        raise ValueError(f"--split applies to the named data sets ({', '.join((*IDX_SETS, *VAL_SPLIT_SETS))}); a "
                         f"folder is one split: pass the split's own folder (e.g. imagenet/val) as --data")
    check_side("--img-size", args.img_size)
    model = load_checkpoint(args.checkpoint, img_size=args.img_size)
    check_size_args(args, model, parse_device(getattr(args, "device", None) or "cpu"))
    shape, name = tuple(model.input_shape), Path(args.checkpoint).name
    if len(shape) == 3 and shape[1] != shape[2]:
        raise ValueError(f"{name} runs at {shape[1]}x{shape[2]} images but datasets are loaded square; pass "
                         f"--img-size N to evaluate at NxN")
    if len(shape) == 3 and not named and shape[0] not in (1, 3):
        raise ValueError(f"{name} takes {shape[0]}-channel images but image folders give 1 (grey) or 3 (RGB)")
    if check is not None:
        check(model)
    split = args.split or default_split
    try:
        dataset = load_dataset(args.data, split, input_shape=shape, limit=limit, start=start)
    except FileNotFoundError as err:
        if not named or split == "test" or data.root is not None or not suggest_test:
            raise
        raise FileNotFoundError(f"{err}; or use the test split, which ships with mambamerge: --split test") from None
    label = f"{args.data} {split}" if named else args.data
    if len(dataset) == 0:
        raise ValueError(f"{label} holds no inputs" + (f" from input {start} on" if start else ""))
    check_fit(model, dataset.info, label)
    check_classes(model, dataset.info, label)
    return model, dataset, label


def describe(model, checkpoint: str) -> str:
    from mambamerge.evaluate import describe_input

    cfg = model.cfg
    return (f"{Path(checkpoint).name}: {model.family} model, {cfg.depth} blocks, width {cfg.embed_dim}, "
            f"{model.layout.length} tokens ({describe_input(model.input_shape)}), {cfg.num_classes} classes")


def run(args: argparse.Namespace) -> int:
    import torch

    from mambamerge import distributed
    from mambamerge.atomic import check_target, write_bytes
    from mambamerge.distributed import world
    from mambamerge.evaluate import evaluate
    from mambamerge.results import check_writable, environment, json_text

    options = check_common(args)
    check_method_args(args, options)
    config = read_config(args.config)
    if config is not None and (args.method is not None or options):
        raise ValueError("--config gives the method, options and schedule: drop --method, --reduction and --option")
    if args.json:
        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json} is a folder; give a file name, e.g. {Path(args.json) / 'eval.json'}")
        check_target(Path(args.json))
        check_writable(Path(args.json).parent, create=False)
    model, dataset, label = load_inputs(args)
    if config is not None:
        from mambamerge.tune import recipe_of_config

        recipe = recipe_of_config(config, model)
    else:
        recipe = recorded_merge(model, args.checkpoint, "eval", "running it that way (--method none runs it dense)") \
            if args.method is None else None
    method = recipe.method if recipe else None if args.method == "none" else args.method
    if recipe:
        options = recipe.patch_options()
    timing = dict(batch_size=args.batch_size, throughput_batch=args.throughput_batch, runs=args.runs, amp=args.amp,
                  workers=default_workers(args.workers), compile=args.compile)
    result = evaluate(model, dataset, method, args.reduction, progress="eval: top-1", **timing, **options)
    distributed.teardown()
    if not world().is_main:
        return 0
    cfg = model.cfg
    print(f"model       {describe(model, args.checkpoint)}")
    kind = result["input_kind"]
    print(f"data        {label}: {result['inputs']} {kind}")
    if result["unreadable_images"]:
        print(f"skipped     {len(result['unreadable_images'])} unreadable files (named in the warnings above)")
    if recipe:
        print(f"method      {recipe.describe()} ({'from ' + args.config if config else 'recorded in the checkpoint'})")
    elif method:
        target = f"target reduction {args.reduction:.0%}" if args.reduction is not None else "schedule from options"
        listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
        print(f"method      {method}, {target}" + (f" ({listed})" if listed else ""))
    print(f"reduction   {result['average_reduction']:.1%} of token-layers; tokens per block: average "
          f"{result['average_tokens']:.1f}, final {result['final_tokens']} of {result['initial_tokens']}")
    print(f"top-1       {result['top1']:.2%}")
    print("top-5       " + (f"{result['top5']:.2%}" if result["top5"] is not None else
                            f"- ({cfg.num_classes} classes: every label is among the top 5)"))
    print(f"GMACs       {result['gmacs_one_direction']:.4g} one scan direction (the literature's \"GFLOPs\"), "
          f"{result['gmacs_both_directions']:.4g} both directions, merge overhead "
          f"{result['gmacs_merge_overhead']:.2g} (multiply-accumulates x10^9 per {kind[:-1]})")
    device = next(model.parameters()).device
    timed = (f"batch {args.throughput_batch}, median of {args.runs}, {device}, autocast {args.amp}, CPU threads: "
             f"{torch.get_num_threads()}" + (f", process 0 of {world().size}" if world().active else ""))
    if method:
        print(f"throughput  {result['inputs_per_s']:.1f} {kind}/s; dense {result['dense_inputs_per_s']:.1f} {kind}/s "
              f"timed interleaved with it: speed-up {result['speedup']:.2f}x ({timed})")
    else:
        print(f"throughput  {result['inputs_per_s']:.1f} {kind}/s ({timed})")
    if result["compile_s"]:
        print(f"compile     {compile_line(result['compile_s'])}")
    if args.json:
        from mambamerge.data import subset_record

        payload = {"checkpoint": str(args.checkpoint), "model": cfg.to_dict(), "data": label, **subset_record(args.limit),
                   "method_from": args.config if config else "checkpoint" if recipe else "command line",
                   "environment": environment(next(model.parameters()).device), "result": result}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, json_text(payload))
        print(f"json        {path}")
    return 0
