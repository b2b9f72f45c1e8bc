"""ImageNet-style ImageFolder data through torchvision (optional dependency), with the study's transforms."""

from __future__ import annotations

import copy
from pathlib import Path

from csn.data.registry import register_dataset
from csn.data.tensors import DataSplits
from csn.data.validate import path_problem
from csn.errors import CsnError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision():
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets, transforms
    except Exception as e:  # noqa: BLE001 -- ImportError, or a torchvision built for another torch
        raise CsnError(f"the ImageFolder/ImageNet path needs torchvision, which is not usable here ({type(e).__name__}); "
                       "install it with `pip install 'csn[vision]'` (a torchvision matching your torch).") from None
    return datasets, transforms


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""What torchvision's ImageFolder reads as images."""


def check_folders(root: Path) -> list[str]:
    """The class names of an ImageFolder tree, checked before anything is read: train/ and val/ hold the same
    class folders (at least 2), each with at least one image; else one CsnError naming the folder and the fix."""
    layout = f"expected {root}/train/<class>/<images> and {root}/val/<class>/<images>"
    problem = path_problem(root, "directory")
    if problem:
        raise CsnError(f"data root {root} {problem}; {layout}.")
    classes = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise CsnError(f"{d} is missing or has no class folders; {layout}.")
        classes[split] = sorted(p.name for p in d.iterdir() if p.is_dir())
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise CsnError(f"{root}/train and {root}/val have different class folders ({', '.join(only[:5])} in one only); "
                       "give every class a folder in both.")
    if len(classes["train"]) < 2:
        raise CsnError(f"{root}/train has one class folder; a classifier needs at least 2 classes.")
    for split in ("train", "val"):
        for c in classes[split]:
            if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in (root / split / c).rglob("*")):
                raise CsnError(f"{root / split / c} holds no image ({', '.join(IMAGE_EXTENSIONS)}); every class needs "
                               "images in train/ and in val/ (class selectivity averages over every class).")
    return classes["train"]


@register_dataset("imagefolder", options=("image_size", "resize"), summary="data_root with train/ and val/ "
                  "class folders (torchvision)")
def imagefolder(data_root: str | None, image_size: int = 224, resize: int = 256) -> DataSplits:
    """Train/val ImageFolders under data_root (data_root/train/<class>/*.JPEG, data_root/val/<class>/*.JPEG).

    Train transform: RandomResizedCrop(224) + horizontal flip; eval: Resize(256) + CenterCrop(224),
    as in the study. `train_eval` is the training split under the eval transform (analyses read
    activations without augmentation, also on the training split and for BatchNorm re-estimation).
    Iterate with a torch DataLoader (see csn.training) using worker processes.
    """
    if not data_root:
        raise CsnError("the imagefolder dataset needs --data-root DIR holding train/ and val/ class folders.")
    root = Path(data_root)
    check_folders(root)
    datasets, transforms = _torchvision()
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(), norm])
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    train_eval = copy.copy(train)  # the same file list (no second scan), read without augmentation for analyses
    train_eval.transform = eval_tf
    return DataSplits("imagefolder", train, test, len(train.classes), 3, image_size, list(train.classes),
                      train_eval=train_eval)
