"""`mambamerge info`: list the models (input, size, parameters, GMACs), or describe what a checkpoint
file holds."""
import argparse

HELP = ("list the known models, or show the architecture, class names and fine-tuned token reduction of a "
        "checkpoint file")
EXAMPLES = ("--models", "vim_t_midclstok_76p1acc.pth", "model.safetensors --img-size 384")
_CLASSES_SHOWN = 20


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint to describe (.pth or .safetensors)")
    p.add_argument("--img-size", type=int, default=None,
                   help="resolution to infer the geometry for (default: the one the file records, else 224)")
    p.add_argument("--models", action="store_true",
                   help="list the model names create_model accepts, with input, size, parameters and GMACs")


def list_model_table() -> None:
    """One line per named model: family, input, depth, width, tokens, parameters, GMACs of one input
    (both conventions); then the official long names and the model each stands for. The models are
    built on torch's meta device: shapes only, no memory, no weights."""
    import torch

    from mambamerge.evaluate import describe_input
    from mambamerge.flops import flops
    from mambamerge.models import OFFICIAL_NAMES, create_model, list_models
    from mambamerge.models.adapter import family_title

    header = ("name", "family", "input", "depth", "width", "tokens", "parameters", "GMACs 1-dir / 2-dir")
    rows = [header]
    for name in list_models():
        if name in OFFICIAL_NAMES:
            continue
        with torch.device("meta"):
            model = create_model(name)
        report = flops(model)
        rows.append((name, family_title(model.family), describe_input(model.input_kind, model.input_shape),
                     str(model.cfg.depth), str(model.cfg.embed_dim), str(model.layout.length),
                     f"{report.params / 1e6:.2f} M", f"{report.one_direction / 1e9:.4g} / "
                                                    f"{report.both_directions / 1e9:.4g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\nGMACs: multiply-accumulates x10^9 per input (the literature's \"GFLOPs\"); 1-dir counts each block's "
          "scan once (the literature's convention), 2-dir what the mixer runs.\n\nofficial Vim names:")
    for name, short in OFFICIAL_NAMES.items():
        print(f"{name}  (= {short})")


def run(args: argparse.Namespace) -> int:
    if args.models or not args.checkpoint:
        list_model_table()
        return 0
    from mambamerge.evaluate import describe_input
    from mambamerge.checkpoint import infer_architecture, read_checkpoint

    raw = read_checkpoint(args.checkpoint)
    adapter, cfg, grid, _ = infer_architecture(raw, args.checkpoint, img_size=args.img_size)
    n = sum(t.numel() for t in raw.state_dict.values())
    print(f"{args.checkpoint}: {adapter.title}, {len(raw.state_dict)} tensors, {n / 1e6:.2f} M values")
    built_for = describe_input(adapter.model_class.input_kind, adapter.model_class.input_shape_for(cfg))
    print(f"trained grid {'x'.join(map(str, grid))}; built for {built_for}: grid {'x'.join(map(str, cfg.grid_size))}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:15s} {value}")
    if cfg.num_classes == 0:
        print("no classification head: a feature extractor (its forward gives the pooled feature)")
    if raw.classes is not None:
        shown = ", ".join(raw.classes[:_CLASSES_SHOWN])
        more = f" ... and {len(raw.classes) - _CLASSES_SHOWN} more" if len(raw.classes) > _CLASSES_SHOWN else ""
        print(f"classes ({len(raw.classes)}): {shown}{more}")
    if raw.merge is not None:
        print(f"token reduction it was saved running (fine-tuned with): {raw.merge.describe()} (eval, sweep and speed "
              f"default to it; mambamerge.patch(model, model.merge_recipe) in Python)")
    return 0
