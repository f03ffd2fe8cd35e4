"""Saving a model so that it reloads without the config or the run that made it.

A pruned model is rebuilt rather than unpickled: the file holds the architecture spec, the channel
plans that were applied to it (replayed in order on a fresh model), the weights, and the unstructured
masks if it has any. Everything is tensors and plain values, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.backbones import rebuild
from prunelab.io import atomic_write, save_torch
from prunelab.structure import ChannelPlan, MaskPlan, ModelRecord, apply_channel_plan, has_masks, masks_of, model_record
from prunelab.structure.masks import attached, fold_masks

FORMAT = "prunelab-model-v1"


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with attached masks folded in: `weight` holds exact zeros, no parametrizations."""
    state = model.state_dict()
    for name, (module, tensor_name, _) in attached(model).items():
        prefix = f"{name[: -len(tensor_name)]}parametrizations.{tensor_name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state[name] = getattr(module, tensor_name).detach()
    return state


def _mask_tensors(model: nn.Module) -> dict[str, torch.Tensor] | None:
    plan = model_record(model).masks
    if plan is None and has_masks(model):
        plan = masks_of(model)
    if plan is None:
        return None
    return {name: mask.detach().cpu() for name, mask in plan.masks.items()}


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write everything needed to rebuild a model built by `prunelab.backbones.create` or `from_target`.

    That is the model's record (`model.prunelab`): its spec, the applied channel plans with the input
    shape they were traced at (required with plans) and its masks; and the weights, with any attached
    masks folded in. The file is written atomically, so a killed run never leaves a half-written model.
    A model of the user's own class (given to `prunelab.prune`) has no spec: its file holds the rest,
    and `load_model` rebuilds it on an unpruned instance of that class (`base`).
    """
    info = model_record(model)
    if info.plans and info.input_shape is None:
        raise ValueError(
            "save_model: the model has channel plans but no input shape; set model.prunelab.input_shape to the "
            "(C, H, W) the plans were applied at, so that load_model can replay them"
        )
    payload: dict[str, Any] = {
        "format": FORMAT,
        "spec": dict(info.spec) if info.spec is not None else None,
        "state_dict": _plain_state_dict(model),
        "plans": [plan.to_dict() for plan in info.plans],
        "masks": _mask_tensors(model),
        "input_shape": list(info.input_shape) if info.input_shape is not None else None,
    }
    return save_torch(path, payload)


def load_model(path: str | Path, map_location: str | torch.device = "cpu", base: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model from its file alone: architecture, channel plans, weights, masks.

    A model built from a spec (a registered backbone's, or a `_target_` class's from `backbone=custom`, whose
    module must be importable here) is rebuilt from it. A model of the user's own class given from Python
    (saved without a spec) is rebuilt on a copy of `base`, an unpruned
    instance of that class (its weights are replaced); `base` is left as it is.
    Masks come back in the record (`model.prunelab.masks`, a MaskPlan) but are not attached; the weights
    already hold their zeros. Attach them with `prunelab.structure.attach_masks` to keep training sparse.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path.resolve()}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a prunelab model file (expected format '{FORMAT}')")
    if payload["spec"] is not None:
        model = rebuild(payload["spec"])
    elif base is not None:
        model = copy.deepcopy(base)
        model.__dict__["prunelab"] = ModelRecord()
    else:
        raise ValueError(
            f"{path} holds a model of the user's own class (no prunelab backbone spec): load it with "
            "load_model(path, base=<an unpruned instance of that class>)"
        )
    input_shape = payload.get("input_shape")
    if input_shape is not None:
        model_record(model).input_shape = tuple(int(n) for n in input_shape)
    for plan_dict in payload.get("plans") or []:
        apply_channel_plan(model, ChannelPlan.from_dict(plan_dict), model_record(model).input_shape)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(
            f"the weights in {path} do not fit the architecture {payload['spec'] or type(model).__name__}: {err}"
        ) from err
    masks = payload.get("masks")
    if masks is not None:
        model_record(model).masks = MaskPlan(dict(masks))
    return model


# `export.format`: what a run writes for deployment, and the file it writes it to.
FORMATS = {"torchscript": "model.ts", "torchscript_frozen": "model.ts", "onnx": "model.onnx"}
# An exported model's outputs may differ from the in-memory model's by this much, relative to the
# largest output (at least 1): BatchNorm folding and other kernels change the rounding, nothing more.
TOLERANCE = 1e-4


def export_deployable(
    model: nn.Module, path: str | Path, input_shape: tuple[int, ...], format: str = "torchscript"
) -> Path:
    """Write the model (eval mode, masks folded) in a form that runs without prunelab, any batch size.

    `torchscript`: traced TorchScript. `torchscript_frozen`: the same, frozen (`torch.jit.freeze`:
    parameters become constants and BatchNorm is folded into the convolution before it).
    `onnx`: ONNX from torch's exporter (`dynamo=True`) with a dynamic batch dimension, for onnxruntime.
    The file is reloaded and its outputs compared with the model's on a batch of three random inputs (exported from
    two); a difference above `TOLERANCE` (relative to the largest output) raises. The model passed in keeps its
    mode, masks and hooks (the export works on a copy).
    """
    if format not in FORMATS:
        raise ValueError(f"export.format must be one of {sorted(FORMATS)}, got {format!r}")
    deployable = fold_masks(copy.deepcopy(model)).eval()
    param = next(deployable.parameters())
    # A batch of 2 to export from (torch.export specialises a dimension of size 1), another size to check on.
    example = torch.randn(2, *input_shape, device=param.device, dtype=param.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still the format that loads with
        # torch alone and runs any batch size; its deprecation warnings are expected here.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        if format == "onnx":
            program = torch.onnx.export(
                deployable, (example,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},)
            )
            path = atomic_write(path, lambda tmp: program.save(str(tmp)))
        else:
            traced = torch.jit.trace(deployable, example)
            if format == "torchscript_frozen":
                traced = torch.jit.freeze(traced)
            path = atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp)))
        x = torch.randn(3, *input_shape, device=param.device, dtype=param.dtype)
        expected = deployable(x)
        got = load_deployed(path, device=param.device)(x)
    error = float((got.to(expected) - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    if not error <= TOLERANCE:
        raise RuntimeError(
            f"the {format} export in {path} differs from the model by {error:.2e} (relative; allowed {TOLERANCE:g})"
        )
    return path


class OnnxModel:
    """An onnxruntime session called like a module: tensor in, tensor out (on the input's device).

    It runs on the GPU where `device` is CUDA and onnxruntime has its CUDA provider (onnxruntime-gpu),
    else on the CPU (`self.device` says which).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # As many threads as torch uses, so that deployed and eager timings are comparable.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        cuda = torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        self.device = "cuda" if cuda else "cpu"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_deployed(path: str | Path, device: str | torch.device = "cpu", optimize: bool = False):
    """The exported model in `path` (`.ts`: TorchScript, `.onnx`: onnxruntime), ready to call.

    `optimize` also runs `torch.jit.optimize_for_inference` on a frozen TorchScript model, as a
    deployment does after loading it (its MKL-DNN layouts cannot be saved in the file itself).
    """
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxModel(path, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        module = torch.jit.load(str(path), map_location=device)
        # A frozen module has no `training` attribute (optimize_for_inference would freeze any other one).
        if optimize and not hasattr(module, "training"):
            module = torch.jit.optimize_for_inference(module)
    return module
