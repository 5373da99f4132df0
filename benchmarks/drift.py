"""How far each method moves the class-token feature from the dense model's, at equal reduction.

Random images through a Vim-Ti with weights drawn around Mamba's initialisation (no trained Vim can be
downloaded here); reports the mean cosine similarity between the dense and the reduced model's class
feature (1.0 = no drift). Off-the-shelf accuracy on real data comes from `mambamerge sweep`.

Run: .venv/bin/python benchmarks/drift.py [--methods mame tome_unordered ...] [--reductions 0.2 0.4 ...]
"""
import argparse

import torch

import mambamerge
from mambamerge.merge import METHODS


def drifted_model(name="vim_tiny", seed=0, scale=0.02):
    """A model with Mamba's initialisation plus Gaussian noise of `scale` on every weight, so that
    tokens interact (a freshly initialised Vim is nearly the identity on the class token)."""
    torch.manual_seed(seed)
    model = mambamerge.create_model(name).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def class_feature_similarity(model, images, method, reduction, **options):
    """Mean cosine similarity of the class feature with and without reduction."""
    with torch.inference_mode():
        mambamerge.unpatch(model)
        dense = model.pooled_features(images)
        mambamerge.patch(model, method, reduction=reduction, **options)
        reduced = model.pooled_features(images)
        mambamerge.unpatch(model)
    return torch.cosine_similarity(dense, reduced, dim=-1).mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model = drifted_model(seed=args.seed)
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"class-feature cosine similarity to the dense Vim-Ti ({args.images} random images, "
          f"geometric schedule from block 1)")
    print(f"{'method':<16}" + "".join(f"{r:>8.0%}" for r in args.reductions))
    for method in args.methods:
        cells = []
        for r in args.reductions:
            try:
                cells.append(f"{class_feature_similarity(model, images, method, r):>8.3f}")
            except ValueError:
                cells.append(f"{'n/a':>8}")
        print(f"{method:<16}" + "".join(cells))


if __name__ == "__main__":
    main()
