"""`mambamerge eval`: one checkpoint, one method, one reduction: top-1, top-5, GMACs and measured
throughput beside the dense model's."""
import argparse
from pathlib import Path

from mambamerge.cli.inputs import describe, load_inputs, recorded_merge
from mambamerge.cli.options import (add_common, add_config_option, add_method_options, check_common,
                                    check_method_args, compile_line, default_workers, read_config)

HELP = "evaluate a checkpoint with one token-reduction method: top-1, top-5, GMACs and measured throughput"
EXAMPLES = ("--checkpoint vim_t_midclstok_76p1acc.pth --data imagenet/val --method mame --reduction 0.4",
            "--checkpoint model.safetensors --data fashion-mnist --limit 1000 --json eval.json",
            "--checkpoint model.safetensors --data fsdd --method tome --option schedule=constant --option r=4")


def add_parser(p: argparse.ArgumentParser) -> None:
    add_common(p)
    add_method_options(p)
    add_config_option(p)
    p.add_argument("--json", metavar="OUT", help="also write every number to this JSON file")


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
