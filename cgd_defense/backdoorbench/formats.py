"""Names and constants shared by BackdoorBench's records and ours (docs/reference/backdoorbench.md).

Kept in one place so reading and writing records cannot disagree on them.
"""
from __future__ import annotations

from ..errors import CGDError

# attack_result.pt: the keys `load_attack_result` requires (section 1.2); without them it returns the raw dict
RECORD_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
# v2 `retrieve_state()` keys we read (section 1.3)
BD_STATE_KEYS = ("bd_data_container", "original_index_array", "poison_indicator")
# extra top-level key of records written by cgd-bench (BackdoorBench's loader ignores extra keys)
CGD_BENCH_KEY = "cgd_bench"

ATTACK_RESULT = "attack_result.pt"
INFO_FILE = "info.pickle"
BD_TRAIN_FOLDER = "bd_train_dataset"
BD_TEST_FOLDER = "bd_test_dataset"

# BackdoorBench `clean_data` -> our dataset registry
DATASET_FROM_BB = {"cifar10": "cifar10", "cifar100": "cifar100", "gtsrb": "gtsrb", "tiny": "tinyimagenet"}
DATASET_TO_BB = {ours: bb for bb, ours in DATASET_FROM_BB.items()}

# The `Normalize` of BackdoorBench's transforms (`get_dataset_normalization`): a BackdoorBench model
# expects inputs normalised with these statistics, which differ from ours (GTSRB: none at all).
BB_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}

# BackdoorBench architectures (`generate_cls_model`) whose state dict is key-for-key and in the same
# order one of our registry's: only these move between the frameworks. BackdoorBench's `resnet18` is
# torchvision's ImageNet-stem ResNet-18, not our CIFAR ResNet-18, so it is deliberately absent.
MODEL_FROM_BB = {"preactresnet18": "preactresnet18"}
BB_ARCHITECTURES = ("resnet18", "preactresnet18", "resnet34", "resnet50", "alexnet", "vgg11", "vgg16", "vgg19",
                    "vgg19_bn", "squeezenet1_0", "densenet161", "inception_v3", "googlenet", "shufflenet_v2_x1_0",
                    "mobilenet_v2", "mobilenet_v3_large", "resnext50_32x4d", "wide_resnet50_2", "mnasnet1_0",
                    "efficientnet_b0", "efficientnet_b3", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32",
                    "densenet121", "resnext29", "senet18", "convnext_tiny")

# Attacks that store trigger-noise ("cross") samples in bd_train with poison_indicator 1 and their
# original label (section 3): there, bd label != original label marks the true poisons.
CROSS_SAMPLE_ATTACKS = ("wanet", "inputaware")


def our_dataset(clean_data: str, source: str) -> str:
    if clean_data not in DATASET_FROM_BB:
        raise CGDError(f"{source}: dataset '{clean_data}' has no counterpart in cgd-bench's dataset registry "
                       f"(supported BackdoorBench datasets: {', '.join(DATASET_FROM_BB)})")
    return DATASET_FROM_BB[clean_data]


def bb_dataset(dataset: str) -> str:
    if dataset not in DATASET_TO_BB:
        raise CGDError(f"dataset '{dataset}' has no BackdoorBench counterpart (BackdoorBench datasets we map: "
                       f"{', '.join(DATASET_TO_BB)})")
    return DATASET_TO_BB[dataset]
