"""Preset names from before the `<method>_<backbone>_<dataset>[_<variant>]` scheme, and the one-line refusal.

A command or a Python call that names an old preset stops before Hydra composes anything, naming the new
name, instead of Hydra's list of every preset.
"""

from __future__ import annotations

from collections.abc import Iterable

RENAMED = {
    "concave_l1_resnet20_cifar10": "concave_resnet20_cifar10_l1",
    "concave_l1_resnet20_cifar100": "concave_resnet20_cifar100_l1",
    "concave_l1_resnet20_tiny_imagenet": "concave_resnet20_tiny_imagenet_l1",
    "concave_l1_resnet56_cifar10": "concave_resnet56_cifar10_l1",
    "concave_l1_vgg11_cifar10": "concave_vgg11_cifar10_l1",
    "concave_l1_vgg11_cifar100": "concave_vgg11_cifar100_l1",
    "concave_l1_vgg11_tiny_imagenet": "concave_vgg11_tiny_imagenet_l1",
    "concave_l1_wrn20_cifar10": "concave_wrn20_cifar10_l1",
    "concave_l1_wrn20_cifar100": "concave_wrn20_cifar100_l1",
    "concave_l1_wrn20_tiny_imagenet": "concave_wrn20_tiny_imagenet_l1",
    "concave_log_resnet20_cifar10": "concave_resnet20_cifar10_log",
    "concave_log_resnet20_cifar100": "concave_resnet20_cifar100_log",
    "concave_log_resnet20_tiny_imagenet": "concave_resnet20_tiny_imagenet_log",
    "concave_log_resnet56_cifar10": "concave_resnet56_cifar10_log",
    "concave_log_vgg11_cifar10": "concave_vgg11_cifar10_log",
    "concave_log_vgg11_cifar100": "concave_vgg11_cifar100_log",
    "concave_log_vgg11_tiny_imagenet": "concave_vgg11_tiny_imagenet_log",
    "concave_log_wrn20_cifar10": "concave_wrn20_cifar10_log",
    "concave_log_wrn20_cifar100": "concave_wrn20_cifar100_log",
    "concave_log_wrn20_tiny_imagenet": "concave_wrn20_tiny_imagenet_log",
    "greedy_mobilenet_v2": "greedy_mobilenet_v2_imagenet",
    "greedy_mobilenet_v3_small": "greedy_mobilenet_v3_small_imagenet",
    "greedy_resnet34": "greedy_resnet34_imagenet",
    "greg_table1_resnet56_cifar10": "greg1_resnet56_cifar10_table1",
    "greg_table1_resnet56_cifar10_l1": "l1_filter_resnet56_cifar10_greg_table1",
    "greg_table1_vgg19_cifar100": "greg1_vgg19_cifar100_table1",
    "greg_table1_vgg19_cifar100_l1": "l1_filter_vgg19_cifar100_greg_table1",
    "greg_table2_resnet56_cifar10": "greg1_resnet56_cifar10_table2",
    "greg_table2_vgg19_cifar100": "greg1_vgg19_cifar100_table2",
    "greg_table3_resnet34_imagenet": "greg1_resnet34_imagenet_table3",
    "greg_table3_resnet50_imagenet_1p49x": "greg1_resnet50_imagenet_table3_1p49x",
    "greg_table3_resnet50_imagenet_2p31x": "greg1_resnet50_imagenet_table3_2p31x",
    "greg_table3_resnet50_imagenet_2p56x": "greg1_resnet50_imagenet_table3_2p56x",
    "greg_table3_resnet50_imagenet_3p06x": "greg1_resnet50_imagenet_table3_3p06x",
    "greg_table4_resnet50_imagenet_unstructured": "greg1_resnet50_imagenet_table4_unstructured",
    "optuna_concave_resnet20": "concave_resnet20_cifar10_optuna",
    "optuna_greg1_resnet56": "greg1_resnet56_cifar10_optuna",
    "optuna_pfs_gamma": "pfs_resnet20_digits_optuna",
    "pfs_cifar10_resnet110": "pfs_resnet110_cifar10",
    "pfs_cifar10_resnet110_official": "pfs_resnet110_cifar10_official",
    "pfs_cifar10_resnet20": "pfs_resnet20_cifar10",
    "pfs_cifar10_resnet20_official": "pfs_resnet20_cifar10_official",
    "pfs_cifar10_resnet56": "pfs_resnet56_cifar10",
    "pfs_cifar10_resnet56_official": "pfs_resnet56_cifar10_official",
    "pfs_cifar10_vgg16": "pfs_vgg16_cifar10",
    "pfs_cifar10_vgg16_official": "pfs_vgg16_cifar10_official",
    "pfs_imagenet_mobilenet_v1": "pfs_mobilenet_v1_imagenet",
    "pfs_imagenet_mobilenet_v2": "pfs_mobilenet_v2_imagenet",
    "pfs_imagenet_resnet50": "pfs_resnet50_imagenet",
    "pfs_quick": "pfs_resnet20_digits_quick",
    "quickstart": "l1_filter_resnet20_digits_quickstart",
}


def renamed_preset(overrides: Iterable[str]) -> str | None:
    """The one-line message for the first override that names a renamed preset (`experiment=old`), or None.

    Multirun lists (`experiment=a,b`) are checked item by item.
    """
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+~") != "experiment":
            continue
        for name in value.split(","):
            if name.strip() in RENAMED:
                return (
                    f"experiment={name.strip()} was renamed experiment={RENAMED[name.strip()]} "
                    "(presets are named <method>_<backbone>_<dataset>[_<variant>])"
                )
    return None
