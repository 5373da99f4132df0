"""`mambamerge visualize`: which original patches each remaining token holds after every reduction step
(one colour per group) beside the input and its Δ importance map, drawn where the patches lie on an
image, a spectrogram (frequency x time) or each frame of a clip; writes DIR/merge_<method>.png and
DIR/merge_<method>.json (the layout and, per step, each input's group id of every patch)."""
import argparse
import json
from pathlib import Path

from mambamerge.cli.diagnose import add_inputs, check_reachable, load_batch
from mambamerge.cli.options import check_method, check_reduction, parse_options

HELP = "draw which original patches each token holds after every merge step, and the Δ importance map"
EXAMPLES = ("--checkpoint model.safetensors --data fashion-mnist --out outputs/visualize",
            "--checkpoint model.safetensors --data fsdd --method tome --reduction 0.4 --out outputs/visualize-audio",
            "--checkpoint model.safetensors --data photos/ --images 8 --out outputs/photos")


def add_parser(p: argparse.ArgumentParser) -> None:
    add_inputs(p, default_count=4)
    p.add_argument("--method", default="mame", metavar="NAME", help="token-reduction method (default: mame)")
    p.add_argument("--reduction", type=float, default=0.5, metavar="R",
                   help="target average reduction in [0, 1) (default 0.5)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule parameter or method option, as for mambamerge.patch; repeatable")


def run(args: argparse.Namespace) -> int:
    from mambamerge.atomic import write_files
    from mambamerge.data.folders import normalisation
    from mambamerge.diagnostics.canvas import (class_token_mark, colour_planes, grid_planes, group_pictures,
                                               leading_panels, patch_geometry, spread)
    from mambamerge.diagnostics.figures import merge_groups_png
    from mambamerge.diagnostics.groups import delta_map, merge_steps
    from mambamerge.results import check_writable

    options = parse_options(args.option)
    check_method(args.method, options)
    check_reduction(args.reduction)
    out = check_writable(args.out, create=False)  # created when the results are written: a refused run leaves none
    model, inputs, _, data = load_batch(args, lambda model: check_reachable(
        model, {args.method: {"method": args.method, **options}}, [args.reduction], "--reduction"))
    layout, geometry = model.layout, patch_geometry(model)
    steps = merge_steps(model, inputs, args.method, args.reduction, **options)
    if not steps:
        raise ValueError(f"{args.method} at {args.reduction:.0%} removes no token; raise --reduction")
    planes = grid_planes(inputs, layout, model.input_kind)
    importance = spread(delta_map(model, inputs, steps[0]["block"] - 1), layout.grid, geometry, planes.shape[1:])
    pictures = [{**step, "picture": group_pictures(planes, step["groups"], layout.grid, geometry)} for step in steps]
    listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
    title = (f"{Path(args.checkpoint).stem}: {args.method} at {args.reduction:.0%} average reduction"
             + (f" ({listed})" if listed else "") + f"; Δ map of block {steps[0]['block'] - 1}")
    name = f"merge_{args.method}"
    groups = {"checkpoint": str(args.checkpoint), "data": data, "method": args.method, "reduction": args.reduction,
              "options": options, "layout": {"grid": layout.grid, "axes": layout.axes, "cls_index": layout.cls_index},
              "steps": [{"block": s["block"], "tokens": s["tokens"], "groups": s["groups"].tolist()} for s in steps]}
    panels = leading_panels(planes.shape[1:], layout, geometry)
    colour = colour_planes(inputs, layout, model.input_kind, *normalisation(3))  # what image folders normalise RGB with
    mark = class_token_mark(layout, geometry, planes.shape[1:])
    png = merge_groups_png(planes, layout.axes, pictures, importance, title, panels, colour, mark)
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, {f"{name}.png": png,
                      f"{name}.json": json.dumps(groups) + "\n"})
    print(f"{data}: {len(steps)} steps, tokens {' -> '.join(str(s['tokens']) for s in steps)}")
    print(f"wrote {name}.png and {name}.json to {out}")
    return 0
