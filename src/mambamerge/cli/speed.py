"""`mambamerge speed`: build a model (or load one), report its size and measure its forward throughput on
random inputs, dense or beside the dense model with a token-reduction method (no data needed)."""
import argparse

from mambamerge.cli.eval import SCHEDULE_KEYS, check_at_least_one, check_method, check_reduction, parse_options
from mambamerge.cli.names import METHODS, MODELS

HELP = "build a model (or load a checkpoint) and measure its forward throughput, dense or with a method"
EXAMPLES = ("--model vim_tiny --batch-size 16", "--model vim_small --method mame --reduction 0.4 --device cuda",
            "--checkpoint model.safetensors --method tome --option schedule=constant --option r=8")


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
    p.add_argument("--method", metavar="NAME",
                   help=f"also time this token-reduction method, interleaved with the dense forwards: "
                        f"{', '.join(METHODS)}")
    p.add_argument("--reduction", type=float, metavar="R", help="target average reduction in [0, 1) for --method")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule parameter or method option, as for mambamerge.patch; repeatable")


def _check(args: argparse.Namespace) -> dict:
    """The parsed --option pairs, after every argument is checked."""
    if args.batch_size < 1 or args.runs < 1:
        raise ValueError("--batch-size and --runs must be at least 1")
    check_at_least_one(args, "threads")
    options = parse_options(args.option)
    if args.method is None:
        if args.reduction is not None or options:
            raise ValueError("--reduction and --option need --method NAME")
        return options
    check_method(args.method, options)
    if args.reduction is None and not set(options) & set(SCHEDULE_KEYS):
        raise ValueError("--method needs --reduction R (e.g. 0.4) or schedule options (e.g. --option "
                         "schedule=constant --option r=5)")
    if args.reduction is not None:
        check_reduction(args.reduction)
    return options


def run(args: argparse.Namespace) -> int:
    options = _check(args)
    import torch

    from mambamerge.checkpoint import load_checkpoint
    from mambamerge.devices import parse_device
    from mambamerge.evaluate import paired_throughput
    from mambamerge.flops import flops
    from mambamerge.models import create_model
    from mambamerge.ops import mixer_backend
    from mambamerge.patch import patch, reduction_summary
    from mambamerge.threads import default_threads, openmp_waiting
    from mambamerge.timing import time_call

    torch.set_num_threads(default_threads(args.threads))
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, img_size=args.img_size)
        name = args.checkpoint
    else:
        model = create_model(args.model, **({"img_size": args.img_size} if args.img_size else {})).eval()
        name = args.model
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    print(f"model        {name}: {cfg.depth} blocks, width {cfg.embed_dim}, d_state {cfg.d_state}")
    print(f"parameters   {params / 1e6:.2f} M")
    print(f"tokens       {model.layout.describe()}, input {tuple(model.input_shape)} per sample")
    print(f"scan         {mixer_backend(device)} on {device}, {torch.get_num_threads()} CPU threads "
          f"({openmp_waiting()})")
    if args.method is None:
        inputs = torch.randn(args.batch_size, *model.input_shape, device=device)
        with torch.inference_mode():
            times = time_call(lambda: model(inputs), device, warmup=1, runs=args.runs)
        best, median = min(times), sorted(times)[len(times) // 2]
        print(f"forward      batch {args.batch_size}: median {median * 1e3:.0f} ms (best {best * 1e3:.0f} ms), "
              f"{args.batch_size / median:.1f} inputs/s")
        return 0
    dense_macs = flops(model).summary()["one_direction"]
    patch(model, args.method, reduction=args.reduction, **options)
    summary, macs = reduction_summary(model), flops(model).summary()
    print(f"method       {args.method}: {summary['average_reduction']:.1%} of token-layers removed, final "
          f"{summary['final_tokens']} of {summary['initial_tokens']} tokens")
    print(f"GMACs        {macs['total_one_direction']:.4g} per input with the merge overhead, dense {dense_macs:.4g} "
          f"(one direction, the literature's convention)")
    patched, dense = paired_throughput(model, args.batch_size, runs=args.runs)
    print(f"forward      batch {args.batch_size}, random inputs, median of {args.runs} interleaved runs: "
          f"{patched:.1f} inputs/s with {args.method}, {dense:.1f} dense: speed-up {patched / dense:.2f}x")
    return 0
