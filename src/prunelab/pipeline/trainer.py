"""The Lightning Trainer of a stage, with its checkpoints: atomic, resumable, and timed across invocations."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from prunelab.io import atomic_write
from prunelab.pipeline.context import Context


class StageClock(Callback):
    """Keeps a fit stage's working time in its checkpoints, so a resumed stage reports all of it."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.earlier = 0.0

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.earlier + time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.earlier = float(state.get("seconds", 0.0))


class StageCheckpoint(ModelCheckpoint):
    """The stage's one checkpoint, `last.ckpt`: after every epoch and, optionally, every N optimizer steps.

    A step save is left out where a validation, the epoch's end or the stage's end follows the step:
    Lightning resumes such a checkpoint past the validation and the epoch-end hooks (the scheduler step,
    the epoch's metrics), so the resumed run would differ. The save after them takes its place.
    """

    def __init__(self, dirpath: Path, every_n_steps: int | None = None):
        # With no monitored metric, top-1 keeps only the newest checkpoint, always named last.ckpt.
        super().__init__(
            dirpath=dirpath,
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n_steps,
        )
        # Lightning takes step and epoch triggers as exclusive; the epoch save must stay on with steps.
        self._every_n_epochs = 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loop = trainer.fit_loop.epoch_loop
        if (
            loop.batch_progress.is_last_batch
            or trainer.should_stop
            or 0 <= trainer.max_steps <= trainer.global_step
            or _validates_after(trainer)
        ):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _validates_after(trainer: L.Trainer) -> bool:
    """Whether a validation follows this training batch (Lightning's own, private, decision)."""
    loop = trainer.fit_loop.epoch_loop
    check = getattr(loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    # Without the private API (another Lightning version): save the step; a mid-epoch validation's
    # metrics could then be missing after a resume, nothing else.
    return bool(check(fetcher)) if check is not None and fetcher is not None else False


def stage_trainer(ctx: Context, max_epochs: int, callbacks: list[Callback], **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from `cfg.trainer` for one stage (`overrides` replace its fields).

    The data loaders shard themselves across DDP ranks (`prunelab.distributed`), so Lightning's
    padding DistributedSampler is off; BatchNorm is synchronised by the fit runner (torch's SyncBatchNorm
    runs on GPUs only), so Lightning's `sync_batchnorm` is off too.
    """
    options = {k: v for k, v in ctx.cfg.trainer.items() if k not in ("channels_last", "compile")}
    return instantiate(
        OmegaConf.create(options),
        **overrides,
        sync_batchnorm=False,
        use_distributed_sampler=False,
        max_epochs=max_epochs,
        logger=ctx.logger if ctx.logger is not None else False,
        callbacks=callbacks + ctx.callbacks,
        default_root_dir=str(ctx.run_dir),
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name and renamed: a kill never leaves a torn one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(
            path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options)
        )


def checkpoint_readable(path: Path) -> bool:
    """Whether a checkpoint file is a complete archive (torch.save writes zip archives)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False
