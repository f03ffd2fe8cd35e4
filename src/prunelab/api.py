"""prunelab as a library: prune, count, time, inspect and export a model of the user's own, from Python.

`prune` is a thin face over the command's path: it composes the same Hydra config the `prunelab`
command would (`method=<name>`, `budget.<key>=<value>` and the caller's overrides) and runs the same
`pipeline.run`, with the user's model and DataLoaders in place of `backbone` and `dataset`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from torch import nn
from torch.utils.data import DataLoader

from prunelab import pipeline, structure
from prunelab.budget import deployed, latency_device, measure, time_call
from prunelab.data import LoaderDataModule
from prunelab.export import export_deployable, load_model
from prunelab.presets import renamed_preset
from prunelab.schema import register as register_schemas
from prunelab.structure import ChannelGroup, ChannelPlan, MaskPlan, model_record
from prunelab.validate import ConfigError, check_config

log = logging.getLogger("prunelab")

# The configs the `prunelab` command composes (`pkg://prunelab.conf`), on the typed schemas of `prunelab.schema`.
CONF_MODULE = "prunelab.conf"
register_schemas()
# The most sweep combinations of one command `check_command` composes and checks before Hydra runs them.
CHECKED_COMBINATIONS = 64


@dataclass
class PruneResult:
    """What `prune` returns.

    `model`: the pruned model (channels removed, or weights masked to exact zeros); `plan`: what was
    decided: a MaskPlan for unstructured methods, the ChannelPlan for structured ones (a list of them,
    in the order applied, for methods that prune over several rounds), None when nothing was pruned;
    `report`: the run's summary (`model/flops_ratio`, `model/params_ratio`, `model/sparsity`,
    `test/acc` with data, latency when asked; as `summary.json`); `run_dir`: where the run was written.
    """

    model: nn.Module
    plan: ChannelPlan | MaskPlan | list[ChannelPlan] | None
    report: dict[str, Any]
    run_dir: Path


def prune(
    model: nn.Module,
    method: str,
    budget: dict[str, Any] | None = None,
    example_inputs: torch.Tensor | None = None,
    *,
    train: DataLoader[Any] | None = None,
    val: DataLoader[Any] | None = None,
    test: DataLoader[Any] | None = None,
    num_classes: int | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    latency: bool = False,
) -> PruneResult:
    """Prune `model` with `method` (a `prunelab method=` choice) to `budget`, as the `prunelab` command would.

    `budget` holds `budget.*` settings, e.g. {"flops": 0.5} (fraction of FLOPs to keep) or
    {"sparsity": 0.9} (fraction of weights to remove). `example_inputs` is a batch of inputs (any
    shape, not necessarily square; default: the first batch of a loader); the model's output on it
    gives `num_classes` unless that is passed. `train`, `val`, `test` are DataLoaders of (inputs,
    labels) batches: methods that train or score with data need `train`, and a run tests on `test`
    (else `val`). Without `train`, nothing is retrained (`retrain=none`) and without `val` or `test`
    nothing is tested (`test=false`), unless `overrides` choose otherwise; a method or stage that needs
    data it was not given stops at once with a `ConfigError`, before any work. `overrides` are the
    command line's (`"retrain=finetune"`, `"trainer.max_epochs=3"`); `latency` also times the final
    and the dense model (at the config's `latency.batch_sizes`; setting those times them too).

    `model` itself is left as it is: a copy is pruned. The run is written to `run_dir`, by default a
    new directory under the system's temporary directory (`tempfile.mkdtemp`), which is kept
    (`result.run_dir`); calling again with the same `run_dir` and settings resumes or reuses the run.
    """
    budget = dict(budget or {})
    overrides = list(overrides)
    user_overrides("prune()", overrides)
    net = copy.deepcopy(model)
    example_inputs, data = user_data(net, example_inputs, num_classes, train, val, test)
    skipped = _without_data(data, overrides, latency)
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="prunelab-"))
    cfg = compose_config(method, budget, [*skipped, *overrides], run_dir=run_dir)
    # The config records what was given in place of `backbone` and `dataset`.
    with open_dict(cfg):
        cfg.backbone = {"name": f"{type(model).__module__}.{type(model).__qualname__}"}
        cfg.dataset = {
            "name": "loaders",
            "splits": list(data.splits),
            "batch_size": data.batch_size,
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
        }
    report = run_config(cfg, run_dir, model=net, datamodule=data)
    # The final model as the run directory holds it, rebuilt on an unpruned copy of the user's class.
    final = load_model(run_dir / "model.pt", base=model)
    return PruneResult(final, _plan(final), report, run_dir)


def run(overrides: Sequence[str], run_dir: str | Path) -> dict[str, Any]:
    """Run the experiment `prunelab <overrides> hydra.run.dir=<run_dir>` would run, in this process; its summary.

    The way scripts run grids of whole experiments (datasets and backbones from the configs) without a process
    per run: `run(["experiment=pfs_resnet20_digits_quick", "seed=1"], "outputs/pfs_s1")`. As with the command, a
    finished run directory is reused and a killed one resumed; a mistake raises its one-line error
    (`prunelab.errors.ConfigError` and the others) instead of exiting.
    """
    _refuse_renamed(overrides)
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = _compose([f"paths.output_dir={override_value(str(run_dir))}", *overrides])
    return run_config(cfg, run_dir)


def run_config(cfg: DictConfig, run_dir: str | Path, **given: Any) -> dict[str, Any]:
    """Run (or resume) the experiment of a composed config in `run_dir`; its summary.

    The one path from a config to a result: `prunelab` (the command), `run` and `prune` all end here.
    `given` passes a model and a datamodule from Python (`prune`), in place of `backbone` and `dataset`.
    """
    return pipeline.run(cfg, Path(run_dir), **given)


def check_command(args: Sequence[str]) -> None:
    """Compose and check the config of a `prunelab` command line before Hydra runs it: a `ConfigError`, one line.

    A wrong type, an unknown key or choice (the schemas of `prunelab.schema`), an out-of-range value or a
    missing file (`prunelab.validate`) stops the command here, before anything is loaded. With a sweep
    (`seed=0,1,2 -m`), each combination of its choice and range values is checked (the first
    `CHECKED_COMBINATIONS`); values chosen by a sweeper (Optuna's `interval(...)`) are checked when their
    run starts. Flags that change where configs come from (`--config-path`, ...) skip the check.
    """
    overrides = _command_overrides(args)
    if overrides is None:
        return
    _refuse_renamed(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(_one_line(err)) from None
    fixed, sweeps = [], []
    for override, text in zip(parsed, overrides, strict=True):
        if not override.is_sweep_override():
            fixed.append(text)
        else:
            try:
                values = list(override.sweep_string_iterator())
            except (HydraException, TypeError, ValueError):
                # A sweeper's search space (`interval(...)`, `tag(...)`) has no values to list.
                continue
            sweeps.append([f"{override.get_key_element()}={value}" for value in values])
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        for combination in itertools.islice(itertools.product(*sweeps), CHECKED_COMBINATIONS):
            # The run directory is Hydra's to choose (`${hydra:runtime.output_dir}`), which no check reads.
            check_config(_compose(["paths.output_dir=.", *fixed, *combination]))


# Hydra's flags that take a value, and those after which the command composes no experiment's config.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun"}
_NO_CHECK_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--shell-completion",
    "-sc",
    "--info",
    "-i",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def _command_overrides(args: Sequence[str]) -> list[str] | None:
    """The config overrides among a command line's arguments (Hydra's flags left out), or None to skip the check."""
    overrides: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _NO_CHECK_FLAGS:
            return None
        if arg.startswith("-"):
            skip_value = flag in _VALUE_FLAGS and "=" not in arg
            continue
        overrides.append(arg)
    return overrides


def _refuse_renamed(overrides: Sequence[str]) -> None:
    """A renamed preset among `overrides` raises its one-line `ConfigError`."""
    renamed = renamed_preset(overrides)
    if renamed is not None:
        raise ConfigError(renamed)


def _compose(overrides: Sequence[str]) -> DictConfig:
    """The command's config for `overrides` (inside an initialised Hydra); what Hydra refuses is a one-line
    `ConfigError`."""
    try:
        return compose("config", overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(composition_error(err)) from None


def composition_error(err: HydraException) -> str:
    """Hydra's refusal in one line, naming the setting: a wrong type or choice, an unknown key, a missing config."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        reason = str(getattr(cause, "msg", cause)).splitlines()[0]
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return f"{key} is not a setting ({reason}); a setting of your own is added with +{key}=<value>"
        return f"{key}: {reason}"
    return _one_line(err).split(" Config search path:")[0]


def compose_config(
    method: str, budget: dict[str, Any], overrides: Sequence[str] = (), run_dir: str | Path | None = None
) -> DictConfig:
    """The config the `prunelab` command composes for `method=<method> budget.<key>=<value> ... <overrides>`.

    `run_dir` sets `paths.output_dir`. An unknown method or budget key, a renamed preset, or an override
    Hydra refuses, raises a one-line `ConfigError`.
    """
    _refuse_renamed(overrides)
    placed = [f"paths.output_dir={override_value(str(run_dir))}"] if run_dir is not None else []
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        methods = GlobalHydra.instance().config_loader().get_group_options("method")
        if method not in methods:
            raise ConfigError(f"method={method!r} does not exist (choices: {', '.join(methods)})")
        asked = [f"method={method}", *placed, *overrides]
        keys = list(_compose(asked).budget)
        unknown = [k for k in budget if k not in keys]
        if unknown:
            raise ConfigError(f"budget key {unknown[0]!r} is not a budget setting (budget keys: {', '.join(keys)})")
        return _compose([*asked, *(f"budget.{k}={override_value(v)}" for k, v in budget.items())])


def count(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, float]:
    """FLOPs (multiply-accumulates of one input), parameters and weight sparsity, as a run reports them."""
    return measure(model, tuple(example_inputs.shape[1:]))


def latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    format: str = "eager",
    device: str | torch.device = "auto",
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Median milliseconds of one forward pass on `example_inputs`, after `warmup` calls, as a run times it.

    `format` "eager" times a copy of the model in eval mode; "torchscript", "torchscript_frozen" or "onnx"
    time it exported, reloaded and optimised, as deployed. `device` "auto" is CUDA when present.
    """
    device = latency_device(device)
    net = deployed(model, tuple(example_inputs.shape[1:]), format, device)
    return time_call(net, example_inputs.to(device), warmup=warmup, repeats=repeats)


def channel_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[ChannelGroup]:
    """The model's prunable channel groups: channels that must be removed together (across residual additions,
    depthwise convolutions, concatenations), each named after the layer that produces them."""
    return structure.channel_groups(model, tuple(example_inputs.shape[1:]))


def export_model(
    model: nn.Module, path: str | Path, example_inputs: torch.Tensor, format: str = "torchscript_frozen"
) -> Path:
    """Write the model in a form that runs without prunelab: "torchscript", "torchscript_frozen" or "onnx".

    (`prunelab.export` is the module that saves and exports models, hence the name.)

    The file is reloaded and checked against the model on random inputs of `example_inputs`' shape.
    """
    return export_deployable(model, path, tuple(example_inputs.shape[1:]), format)


def user_overrides(caller: str, overrides: Sequence[str]) -> None:
    """Refuse, in one line, an override of `backbone` or `dataset`: the model and the data come from Python."""
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] in ("backbone", "dataset"):
            raise ConfigError(f"override {item!r}: {caller} takes the model and the data from Python, not from `{key}`")


def user_data(
    model: nn.Module,
    example_inputs: torch.Tensor | None,
    num_classes: int | None,
    train: DataLoader[Any] | None = None,
    val: DataLoader[Any] | None = None,
    test: DataLoader[Any] | None = None,
) -> tuple[torch.Tensor, LoaderDataModule]:
    """The example inputs (default: a loader's first batch) and a datamodule over the user's loaders.

    The number of classes is the model's output width on the example inputs unless given.
    """
    if example_inputs is None:
        example_inputs = _first_inputs(train, val, test)
    classes = num_classes or _num_classes(model, example_inputs)
    return example_inputs, LoaderDataModule(tuple(example_inputs.shape[1:]), classes, train, val, test)


def _first_inputs(*loaders: DataLoader[Any] | None) -> torch.Tensor:
    loader = next((loader for loader in loaders if loader is not None), None)
    if loader is None:
        raise ConfigError("example_inputs (a batch of inputs) are needed when no DataLoader is given")
    inputs: torch.Tensor = next(iter(loader))[0]
    return inputs


def _num_classes(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """The number of classes the model predicts: its output's second dimension on `example_inputs`."""
    param = next(model.parameters())
    with structure.eval_mode(model), torch.no_grad():
        out = model(example_inputs[:1].to(param.device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model's output on example_inputs is {shape}, not (batch, classes): pass num_classes")
    return int(out.shape[1])


def _without_data(data: LoaderDataModule, overrides: list[str], latency: bool) -> list[str]:
    """The overrides that leave out what the data given cannot serve (said in one line), and the timing unless asked."""
    keys = {item.lstrip("+~").split("=", 1)[0] for item in overrides}
    chosen = keys | {key.split(".")[0] for key in keys}
    skipped, reasons = [], []
    if "train" not in data.splits and "retrain" not in chosen:
        skipped.append("retrain=none")
        reasons.append("no retraining (no train loader)")
    if "test" not in data.splits:
        if "test" not in chosen:
            skipped.append("test=false")
            reasons.append("no test (no val or test loader)")
        if "trainer.limit_val_batches" not in chosen:
            skipped.append("trainer.limit_val_batches=0")
    if reasons:
        log.warning("prunelab: %s", "; ".join(reasons))
    if not latency and "latency.batch_sizes" not in chosen:
        skipped.append("latency.batch_sizes=[]")
    return skipped


def _plan(model: nn.Module) -> ChannelPlan | MaskPlan | list[ChannelPlan] | None:
    record = model_record(model)
    if record.masks is not None:
        return record.masks
    if len(record.plans) == 1:
        return record.plans[0]
    return list(record.plans) or None


def override_value(value: Any) -> str:
    """A Python value written as a Hydra override value (strings quoted, so paths and patterns pass as they are)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"budget value {value!r} is not a number, string, list or dict")


def _one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
