"""`mambamerge visualize`: which original patches each remaining token holds after every reduction step
(one colour per group) beside the input and its Δ importance map; writes DIR/merge_<method>.png."""
import argparse
from pathlib import Path

from mambamerge.atomic import write_files
from mambamerge.cli.diagnose import add_inputs, load_images
from mambamerge.cli.eval import check_method, check_reduction, parse_options
from mambamerge.diagnostics.figures import merge_groups_png
from mambamerge.diagnostics.groups import delta_map, merge_steps
from mambamerge.results import check_writable

HELP = "draw which original patches each token holds after every merge step, and the Δ importance map"


def add_parser(p: argparse.ArgumentParser) -> None:
    add_inputs(p, default_images=4)
    p.add_argument("--method", default="mame", metavar="NAME", help="token-reduction method (default: mame)")
    p.add_argument("--reduction", type=float, default=0.5, metavar="R",
                   help="target average reduction in [0, 1) (default 0.5)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule parameter or method option, as for mambamerge.patch; repeatable")


def run(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    check_method(args.method, options)
    check_reduction(args.reduction)
    out = check_writable(args.out)
    model, images, _, data = load_images(args)
    if len(model.layout.grid) != 2:
        raise ValueError(f"visualize draws models of images (a 2-D patch grid); this one has {model.layout.describe()}")
    steps = merge_steps(model, images, args.method, args.reduction, **options)
    if not steps:
        raise ValueError(f"{args.method} at {args.reduction:.0%} removes no token; raise --reduction")
    importance = delta_map(model, images, steps[0]["block"] - 1)
    listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
    title = (f"{Path(args.checkpoint).stem}: {args.method} at {args.reduction:.0%} average reduction"
             + (f" ({listed})" if listed else "") + f"; Δ map of block {steps[0]['block'] - 1}")
    name = f"merge_{args.method}.png"
    write_files(out, {name: merge_groups_png(images, model.layout.grid, steps, importance, title)})
    print(f"{data}: {len(steps)} steps, tokens {' -> '.join(str(s['tokens']) for s in steps)}")
    print(f"wrote {Path(out) / name}")
    return 0
