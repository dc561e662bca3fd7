"""Datasets: registry, decoding cache, torchvision-style wrappers, and seeded splits."""
from .datasets import (CIFAR10_CLASSES, DatasetInfo, ImageData, get_dataset_info, list_datasets, load_split,
                       locate, register_dataset, resolve_data_root)
from .splits import stratified_holdout
from .vision import CIFAR10, CIFAR100, GTSRB, TinyImageNet, TensorImageDataset

__all__ = ["CIFAR10_CLASSES", "DatasetInfo", "ImageData", "get_dataset_info", "list_datasets", "load_split",
           "locate", "register_dataset", "resolve_data_root", "stratified_holdout", "CIFAR10", "CIFAR100",
           "GTSRB", "TinyImageNet", "TensorImageDataset"]
