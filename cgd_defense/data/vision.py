"""torchvision-style dataset classes over the decoded tensors, for users who want a `Dataset`.

Same constructor shape as `torchvision.datasets.CIFAR10`: (root, train, transform, target_transform,
download); items are (uint8 CHW tensor, label) unless a transform is given.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from ..harness.cache import Cache
from .datasets import ImageData, load_split


class TensorImageDataset(Dataset):
    def __init__(self, data: ImageData, transform=None, target_transform=None):
        self.data = data
        self.transform = transform
        self.target_transform = target_transform

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.data.classes)}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data.images[index], int(self.data.labels[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"Dataset {type(self).__name__}", f"    Number of datapoints: {len(self)}"]
        lines += [f"    {line}" for line in self.extra_repr().splitlines() if line]
        if self.transform is not None:
            lines.append(f"    Transform: {self.transform}")
        return "\n".join(lines)


class _Registered(TensorImageDataset):
    dataset_name = ""

    def __init__(self, root, train: bool = True, transform=None, target_transform=None, download: bool = False,
                 cache: Cache | None = None):
        self.root = root
        self.train = train
        super().__init__(load_split(self.dataset_name, root, train, cache=cache, download=download),
                         transform, target_transform)

    def extra_repr(self) -> str:
        return f"Root location: {self.root}\nSplit: {'Train' if self.train else 'Test'}"


class CIFAR10(_Registered):
    dataset_name = "cifar10"


class CIFAR100(_Registered):
    dataset_name = "cifar100"


class GTSRB(_Registered):
    dataset_name = "gtsrb"


class TinyImageNet(_Registered):
    dataset_name = "tinyimagenet"
