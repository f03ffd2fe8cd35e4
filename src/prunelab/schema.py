"""The typed configuration: dataclasses in Hydra's ConfigStore for the groups whose fields are fixed.

Hydra composes every command's config onto these schemas (conf/config.yaml's first default is
`prunelab_schema`; each of prunelab's dataset configs starts from its `schema/dataset/<name>`, the
trainer configs from `schema/trainer`), so a wrong type (`seed=abc`), an unknown choice
(`retrain.mode=sideways`) or an unknown key (`budget.flopz=0.5`) is refused while the config is composed.
What a type cannot say (ranges, sizes against the data, files that must exist) is checked by
`prunelab.validate` right after.

The groups whose fields are the arguments of the classes they build stay open: `backbone`, `method`,
`optimizer`, `scheduler` and `logger` (each class checks its own arguments), and a user's own datamodule
(`dataset=custom`). An argument of a dataset or of Lightning's Trainer that its config does not list is added
as before, with `+dataset.subset=1000` or `+trainer.num_nodes=2`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# OmegaConf reads the fields' annotations at run time (`float | None` is an optional float).


class Choice(str, Enum):
    """A setting with a fixed set of values, each member named as its value: compares, hashes and prints as its
    value (`mode == "rewind"`)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:
        return repr(self.value)


class RetrainMode(Choice):
    """`retrain.mode`: what the pruned model starts its retraining from."""

    finetune = "finetune"
    none = "none"
    rewind = "rewind"
    scratch = "scratch"
    scratch_b = "scratch_b"


class Scope(Choice):
    """`budget.scope`: unstructured sparsity ranked over all layers, or the same fraction in each."""

    # OmegaConf matches an enum by its members' names, and "global" is a Python keyword: set in the namespace.
    vars()["global"] = "global"
    layer = "layer"


class LatencyRanking(Choice):
    """`budget.latency_ranking`: channels ranked by importance, or by importance per millisecond (HALP)."""

    importance = "importance"
    per_ms = "per_ms"


class ExportFormat(Choice):
    """`export.format`: the deployable file a run writes beside model.pt."""

    torchscript = "torchscript"
    torchscript_frozen = "torchscript_frozen"
    onnx = "onnx"


class LatencyFormat(Choice):
    """`budget.latency_format`: the form a latency budget is measured in (an export format, or eager)."""

    eager = "eager"
    torchscript = "torchscript"
    torchscript_frozen = "torchscript_frozen"
    onnx = "onnx"


#: The export formats, in the order the docs list them.
EXPORT_FORMATS: tuple[str, ...] = tuple(f.value for f in ExportFormat)
#: The values each choice setting takes (for messages and docs).
CHOICES: dict[str, tuple[str, ...]] = {
    "retrain.mode": tuple(m.value for m in RetrainMode),
    "budget.scope": tuple(s.value for s in Scope),
    "budget.latency_ranking": tuple(r.value for r in LatencyRanking),
    "budget.latency_format": tuple(f.value for f in LatencyFormat),
    "export.format": EXPORT_FORMATS,
}


@dataclass
class BudgetConfig:
    """`budget`: what pruning must reach (conf/budget/default.yaml documents each field)."""

    flops: float | None = None
    params: float | None = None
    sparsity: float | None = None
    layer_ratios: list[Any] | None = None
    tolerance: float = 0.01
    iterations: int = 30
    round_to: int = 1
    scope: Scope = Scope["global"]
    prune_coupled: bool = True
    latency: float | None = None
    latency_batch_size: int = 1
    latency_device: str = "${latency.device}"
    latency_format: LatencyFormat = MISSING
    latency_cache: str = "${paths.output_root}/latency_tables"
    latency_tolerance: float = 0.05
    latency_rounds: int = MISSING
    latency_ranking: LatencyRanking = LatencyRanking.importance


@dataclass
class RetrainConfig:
    """`retrain`: how the pruned model is retrained (conf/retrain/finetune.yaml documents each field)."""

    mode: RetrainMode = RetrainMode.finetune
    epochs: int | None = None
    lr: float | None = None
    optimizer: Any = None
    scheduler: Any = None
    max_factor: float | None = None
    rewind_iteration: int = 0
    with_val: bool = False


@dataclass
class PretrainConfig:
    """`pretrain`: dense training before a pruning method starts."""

    epochs: int = 0
    lr: float | None = None
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class BnRecalibrationConfig:
    """`bn_recalibration`: BatchNorm statistics re-estimated after pruning."""

    batches: int = 0


@dataclass
class StructureConfig:
    """`structure`: what structured pruning leaves whole."""

    skip: list[str] = field(default_factory=list)
    prune_embedding: bool = False
    prune_head_dim: bool = False


@dataclass
class LatencyConfig:
    """`latency`: how the final and the dense model are timed."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 3
    repeats: int = 10
    rounds: int = 5
    max_seconds: float | None = 20.0
    device: str = "auto"


@dataclass
class ExportConfig:
    """`export`: the deployable file a run writes."""

    format: ExportFormat | None = ExportFormat.torchscript_frozen


@dataclass
class PathsConfig:
    """`paths`: where datasets are looked for and runs written."""

    data_dir: str = MISSING
    output_root: str = MISSING
    output_dir: str = MISSING


@dataclass
class DatasetConfig:
    """The fields every prunelab dataset config has; each dataset's schema below adds its own."""

    _target_: str = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    val_size: int = MISSING
    seed: int = MISSING


@dataclass
class CIFARConfig(DatasetConfig):
    """dataset=cifar10 and cifar100."""

    root: str = MISSING
    download: bool = False
    augment: bool = True


@dataclass
class DigitsConfig(DatasetConfig):
    """dataset=digits."""

    root: str = ""
    test_size: int = MISSING
    augment: bool = True
    image_size: int = MISSING
    in_channels: int = MISSING


@dataclass
class ImageFolderConfig(DatasetConfig):
    """dataset=image_folder."""

    root: str = MISSING
    augment: bool = True
    image_size: int = MISSING
    resize: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    stats_images: int = MISSING
    random_resized_crop: bool = False


@dataclass
class ImageNetConfig(DatasetConfig):
    """dataset=imagenet."""

    root: str = MISSING
    augment: bool = True
    image_size: int = MISSING


@dataclass
class SyntheticConfig(DatasetConfig):
    """dataset=synthetic."""

    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    train_size: int = MISSING
    test_size: int = MISSING


@dataclass
class TinyImageNetConfig(DatasetConfig):
    """dataset=tiny_imagenet."""

    root: str = MISSING
    augment: bool = True
    random_resized_crop: bool = False


@dataclass
class TrainerConfig:
    """The fields of prunelab's trainer configs; any other Trainer argument is added with `+trainer.<name>=`."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = MISSING
    devices: Any = MISSING
    strategy: Any = "auto"
    sync_batchnorm: bool = False
    max_epochs: int = MISSING
    precision: Any = MISSING
    gradient_clip_val: float | None = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 50
    enable_progress_bar: bool = True
    deterministic: Any = False
    # prunelab's own speed options (conf/trainer/cpu.yaml), not Trainer arguments.
    channels_last: bool = False
    compile: bool = False


#: Each dataset config's schema, by the name its YAML gives it (`- /schema/dataset@_here_: cifar`).
DATASET_SCHEMAS: dict[str, type] = {
    "cifar": CIFARConfig,
    "digits": DigitsConfig,
    "image_folder": ImageFolderConfig,
    "imagenet": ImageNetConfig,
    "synthetic": SyntheticConfig,
    "tiny_imagenet": TinyImageNetConfig,
}


@dataclass
class PrunelabConfig:
    """The top level of every command's config (conf/config.yaml documents each field)."""

    seed: int = 0
    label_smoothing: float = 0.0
    checkpoint_every_n_steps: int | None = None
    paper: Any = None
    objective: str | None = "val/acc"
    quiet: bool = False
    verbose_libraries: bool = False
    test: bool = True
    test_pruned: bool = False
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    bn_recalibration: BnRecalibrationConfig = field(default_factory=BnRecalibrationConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Open groups: their fields are the arguments of the classes they build.
    dataset: Any = None
    backbone: Any = None
    method: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = None


class ProtocolKind(Choice):
    """`protocol.kind`: what the protocol's methods remove, which decides its controls."""

    structured = "structured"
    unstructured = "unstructured"


class Control(Choice):
    """A control `prunelab-bench` adds beside the protocol's results (docs/bench.md says what each one is)."""

    random_channels = "random_channels"
    scratch_e = "scratch_e"
    scratch_b = "scratch_b"
    dense_finetune = "dense_finetune"
    random_mask = "random_mask"
    reinit_mask = "reinit_mask"


@dataclass
class FinetuneConfig:
    """`protocol.finetune`: the fine-tuning every method and control gets after pruning."""

    epochs: int = MISSING
    lr: float = MISSING


@dataclass
class ProtocolConfig:
    """A `prunelab-bench` protocol (conf/protocol/*.yaml documents each field)."""

    name: str = MISSING
    description: str = ""
    kind: ProtocolKind = MISSING
    dataset: list[str] = MISSING
    backbone: list[str] = MISSING
    common: list[str] = field(default_factory=list)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    scratch_lr: float | None = None
    budgets: dict[str, list[str]] = MISSING
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: dict[str, list[str]] = MISSING
    controls: list[Control] = field(default_factory=list)
    anchors: str | None = None


@dataclass
class BenchConfig:
    """The top level of a `prunelab-bench` command's config (conf/bench.yaml documents each field)."""

    protocol: ProtocolConfig = MISSING
    shared: str = "${oc.env:PRUNELAB_SHARED,../shared}"
    out: str = "${oc.env:PRUNELAB_OUTPUTS,outputs}/bench/${protocol.name}"
    jobs: int = 1
    only: list[str] = field(default_factory=list)
    controls: bool = True
    extra: list[str] = field(default_factory=list)
    report: bool = True
    dry_run: bool = False
    wandb: bool = False


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (again, harmlessly, when called twice)."""
    store = ConfigStore.instance()
    store.store(name="prunelab_schema", node=PrunelabConfig)
    store.store(name="bench_schema", node=BenchConfig)
    for name, schema in DATASET_SCHEMAS.items():
        store.store(group="schema/dataset", name=name, node=schema)
    store.store(group="schema", name="trainer", node=TrainerConfig)


register()
