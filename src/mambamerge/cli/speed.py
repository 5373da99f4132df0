"""`mambamerge speed`: build a model (or load one), report its size and measure its forward throughput,
dense or with a token-reduction method beside the dense forward (random inputs: no data needed)."""
import argparse

from mambamerge.cli.inputs import recorded_merge
from mambamerge.cli.names import AMP_CHOICES, MODELS
from mambamerge.cli.options import (add_compile_option, add_method_options, check_at_least_one, check_method_args,
                                    compile_line, parse_options)

HELP = "build a model (or load a checkpoint) and measure its forward throughput, dense or with a method"
EXAMPLES = ("--model vim_tiny --batch-size 16", "--model vim_small --method mame --reduction 0.4 --device cuda",
            "--checkpoint model.safetensors --method tome --option schedule=constant --option r=8",
            "--model vim_nano --batch 1 --method mame --reduction 0.5 --compile")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vim_tiny", choices=MODELS, metavar="NAME",
                   help="model to build (default: vim_tiny; see `mambamerge info --models`)")
    p.add_argument("--checkpoint", help="load this checkpoint instead of building a fresh model")
    p.add_argument("--img-size", type=int, default=None,
                   help="image or frame resolution of a Vim or VideoMamba (default: the model's own)")
    p.add_argument("--batch-size", "--batch", type=int, default=8, metavar="N", help="batch size (default: 8)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores free at start)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="autocast precision of the timed forwards: none (default), bf16 (CPU or GPU), fp16 (GPU)")
    add_compile_option(p)
    add_method_options(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule parameter or method option, as for mambamerge.patch; repeatable")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.runs < 1:
        raise ValueError("--batch-size and --runs must be at least 1")
    check_at_least_one(args, "img_size", "threads")
    options = parse_options(args.option)
    check_method_args(args, options)
    import torch

    from mambamerge.memory import check_side, check_size_args

    from mambamerge.checkpoint import load_checkpoint
    from mambamerge.compiling import compile as compile_model
    from mambamerge.devices import autocast, check_amp, describe_cpu_bf16, parse_device
    from mambamerge.evaluate import paired_throughput
    from mambamerge.flops import flops
    from mambamerge.models import create_model
    from mambamerge.ops import mixer_backend
    from mambamerge.patch import patch, reduction_summary
    from mambamerge.threads import default_threads, openmp_waiting
    from mambamerge.timing import first_call_seconds, time_call

    torch.set_num_threads(default_threads(args.threads))
    check_side("--img-size", args.img_size)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, img_size=args.img_size)
        name = args.checkpoint
    else:
        model = create_model(args.model, **({"img_size": args.img_size} if args.img_size is not None else {})).eval()
        name = args.model
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_amp(args.amp, device)
    check_size_args(args, model, device)
    model = model.to(device)
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    print(f"model        {name}: {cfg.depth} blocks, width {cfg.embed_dim}, d_state {cfg.d_state}")
    print(f"parameters   {params / 1e6:.2f} M; GMACs per input {flops(model).summary()['one_direction']:.4g} (one scan "
          f"direction, the literature's \"GFLOPs\")")
    print(f"tokens       {model.layout.describe()}, input {tuple(model.input_shape)} per sample")
    print(f"scan         {mixer_backend(device)} on {device}, {torch.get_num_threads()} CPU threads "
          f"({openmp_waiting()}); autocast {args.amp}")
    if device.type == "cpu":
        print(f"cpu          {describe_cpu_bf16()}")
    recipe = recorded_merge(model, args.checkpoint, "speed", "timing it that way (--method none times it dense)") \
        if args.method is None and args.checkpoint else None
    if recipe:
        patch(model, recipe)
    elif args.method not in (None, "none"):
        patch(model, args.method, reduction=args.reduction, **options)
    if model.token_reducer is not None:
        summary = reduction_summary(model)
        print(f"merging      {recipe.describe() if recipe else args.method}: {summary['average_reduction']:.1%} "
              f"average reduction, final tokens {summary['final_tokens']} of {summary['initial_tokens']}, GMACs "
              f"{flops(model).summary()['total_one_direction']:.4g} with the merge overhead")
        merged, dense, compile_s = paired_throughput(model, args.batch_size, args.runs, amp=args.amp,
                                                     compile=args.compile)
        print(f"forward      batch {args.batch_size}: {merged:.1f} inputs/s merged, {dense:.1f} dense, timed "
              f"interleaved (median of {args.runs}): speed-up {merged / dense:.2f}x")
    else:
        images = torch.randn(args.batch_size, *model.input_shape, device=device)
        forward = compile_model(model) if args.compile else model
        with torch.inference_mode(), autocast(device, args.amp):
            compile_s = first_call_seconds({"model": lambda: forward(images)}, device) if args.compile else None
            times = time_call(lambda: forward(images), device, warmup=1, runs=args.runs)
        best, median = min(times), sorted(times)[len(times) // 2]
        print(f"forward      batch {args.batch_size}: median {median * 1e3:.0f} ms (best {best * 1e3:.0f} ms), "
              f"{args.batch_size / median:.1f} inputs/s")
    if compile_s:
        print(f"compile      {compile_line(compile_s)}")
    return 0
