"""The experiment's objects built from the config: `build` (Hydra's `instantiate`, with one-line errors),
the datamodule and the backbone."""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab.backbones import from_target
from prunelab.targets import call
from prunelab.validate import ConfigError, check_variant, user_error

# The `_target_` of prunelab's own backbones; any other is a class of the user's own.
CREATE = "prunelab.backbones.create"


def build(node: Any, **kwargs: Any) -> Any:
    """`instantiate`, with a user error raised inside a constructor shown as itself, not Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        found = user_error(err)
        if found is not None:
            raise found from None
        missing = err.__cause__
        if isinstance(missing, FileNotFoundError):
            raise ConfigError(str(missing)) from None
        raise


def build_dataset(node: DictConfig) -> L.LightningDataModule:
    """The datamodule `dataset` describes: one of prunelab's, or a LightningDataModule of the user's own class
    (`dataset=custom dataset._target_=my_pkg.MyDataModule`), built from the node's keys (`targets.call`)."""
    if str(node.get("_target_")).startswith("prunelab."):
        return build(node)
    # A preset's keys left in the node (`dataset._target_=...` without `dataset=custom`) say where to start.
    hint = (
        "; start from dataset=custom to leave out the keys of prunelab's presets: "
        f"dataset=custom dataset._target_={node.get('_target_')} +dataset.<argument>=<value>"
    )
    return call(OmegaConf.to_container(node, resolve=True), "dataset", hint=hint if "val_size" in node else "")[0]


def build_backbone(cfg: DictConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The model `backbone` describes for the data: a prunelab backbone (`prunelab.backbones.create`), or a
    class of the user's own (`backbone=custom backbone._target_=my_pkg.MyNet`, see `backbones.from_target`)."""
    if cfg.backbone.get("_target_") != CREATE:
        return from_target(OmegaConf.to_container(cfg.backbone, resolve=True), num_classes, input_shape[0], input_shape)
    variant = check_variant(cfg, input_shape[-1])
    extra = {"variant": variant} if variant is not None else {}
    return build(cfg.backbone, num_classes=num_classes, in_channels=input_shape[0], **extra)
