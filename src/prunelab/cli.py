"""The `prunelab` command: composes the Hydra config and runs the experiment's pipeline."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prunelab.errors import PrunelabError, user_error
from prunelab.presets import renamed_preset
from prunelab.schema import register as register_schemas

# The configs are the package `prunelab.conf` (the repository's conf/ folder, mapped in pyproject.toml),
# so a source checkout, an editable and a regular install all load them the same way. Users add their
# own config folders on top with `hydra.searchpath=[file:///path/to/my_conf]`.
CONF_PACKAGE = "prunelab.conf"
# The same configs as a folder on disk, for code that composes them with `initialize_config_dir`.
CONF_DIR = Path(str(resources.files(CONF_PACKAGE)))


def run_id(overrides: str | None) -> str:
    """A run directory name derived from the command-line overrides (stable, filesystem-safe)."""
    if not overrides:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,.+_-]", "_", overrides)
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


OmegaConf.register_new_resolver("run_id", run_id, replace=True)
# The typed schemas the configs build on, for whoever composes them from CONF_DIR (tests, scripts).
register_schemas()


def main() -> float | None:
    """The `prunelab` entry point: composes and checks the command's config (`prunelab.api.check_command`),
    refusing a mistake in one line (exit 2), then runs `run` through Hydra."""
    args = sys.argv[1:]
    message = renamed_preset(args)
    if message is None and not _help(args):
        # Imported here, not at the top, so that `prunelab --help` does not load torch and Lightning.
        from prunelab import api

        try:
            api.check_command(args)
        except PrunelabError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            message = str(err)
    if message is not None:
        print(f"prunelab: error: {message}", file=sys.stderr)
        sys.exit(2)
    return run()


def _help(args: list[str]) -> bool:
    return any(
        arg.split("=", 1)[0] in ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc")
        for arg in args
    )


@hydra.main(config_path=f"pkg://{CONF_PACKAGE}", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> float | None:
    """Run one experiment; returns its `objective` (a validation metric) so Hydra sweepers can optimise it.

    A mistake the user can fix (a `PrunelabError`: a bad setting, missing data, a budget that cannot be
    met, a diverging run, a run directory in use) is printed as one line and exits with code 2;
    `HYDRA_FULL_ERROR=1` shows its traceback instead. Anything else is a bug and keeps its traceback.
    A run stopped by SIGTERM (a scheduler's preemption, `kill`) exits with 143, to be resumed.
    """
    # Imported here, not at the top, so that `prunelab --help` and Hydra's config errors do not load Lightning.
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from prunelab import api

    try:
        summary = api.run_config(cfg, HydraConfig.get().runtime.output_dir)
    except SIGTERMException:
        # Lightning ends a terminated fit with a SystemExit of code 0; a stopped run must not look finished.
        print("prunelab: error: stopped by SIGTERM (run the same command again to resume)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception as err:
        found = user_error(err)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"prunelab: error: {found}", file=sys.stderr)
        sys.exit(2)
    return summary.get(cfg.get("objective", "val/acc"))


if __name__ == "__main__":
    main()
