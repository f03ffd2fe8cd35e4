"""Runs the named methods one after another in this process, for tests/test_distributed.py:

    python tests/ddp_methods.py OUT ROLE METHOD...

ROLE `ddp` runs 2 gloo ranks (Lightning starts the second by re-running this command), `single` one process with
the same global batch; each method's run lands in OUT/ROLE/METHOD. A file rather than a test because Lightning
launches the other rank by re-running the command that started the first."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import make_cfg

from prunelab import pipeline
from prunelab.guard import FEW_STEPS

COMMON = [
    "dataset.batch_size=32",
    "pretrain.epochs=1",
    "retrain.epochs=1",
    "trainer.limit_train_batches=3",
    "budget.flops=0.5",
    "budget.sparsity=0.5",
    "budget.tolerance=0.3",
    "optimizer.lr=0.02",
    "latency.batch_sizes=[]",
    "quiet=true",
    "trainer.precision=32-true",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]

if __name__ == "__main__":
    out, role, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for name in names:
        run_dir = out / role / name
        cfg = make_cfg(run_dir, *COMMON, f"method={name}", *FEW_STEPS.get(name, []), *(DDP if role == "ddp" else []))
        pipeline.run(cfg, run_dir)
