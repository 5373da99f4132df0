"""User datasets in the ImageNet layout: <root>/<class name>/<image files>, through torchvision."""
from pathlib import Path

from mambamerge.data.datasets import ImageSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_NAMES = {"train", "val", "test"}


def image_folder(root, img_size: int = 224, in_chans: int = 3):
    """torchvision ImageFolder with Vim's evaluation transform (resize the short side to
    img_size / 0.875, centre crop, ImageNet normalisation). The dataset gets an `info` ImageSet.
    Missing folders, folders without class sub-folders or without images are clear errors."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected <root>/<class name>/<images> (ImageNet layout)")
    if set(classes) <= SPLIT_NAMES:
        raise ValueError(f"{root} holds the split folders {', '.join(classes)}, not class folders: give one split's "
                         f"folder, e.g. {root / classes[-1]}")
    steps = [transforms.Resize(int(round(img_size / 0.875))), transforms.CenterCrop(img_size)]
    if in_chans == 1:
        steps.append(transforms.Grayscale(1))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    except FileNotFoundError as err:
        raise ValueError(f"{root}: no images found ({err}); supported extensions: "
                         f"{', '.join(datasets.folder.IMG_EXTENSIONS)}") from None
    ds.info = ImageSet(list(ds.classes), in_chans, (img_size, img_size))
    return ds
