"""The `prunelab` command: composes the Hydra config and runs the experiment's pipeline."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def run_id(overrides: str | None) -> str:
    """A run directory name derived from the command-line overrides (stable, filesystem-safe)."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,.+_-]", "_", overrides)
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


OmegaConf.register_new_resolver("run_id", run_id, replace=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns the test accuracy so Hydra sweepers can optimise it."""
    from prunelab import pipeline

    summary = pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    return summary.get("test/acc")


if __name__ == "__main__":
    main()
