"""prunelab's Hydra configs. This file makes conf/ the package `prunelab.conf` of an installed copy
(see pyproject.toml), which Hydra reads as `pkg://prunelab.conf`; the configs themselves are YAML.

Importing it puts the typed schemas the configs build on (`prunelab.schema`) in Hydra's ConfigStore."""

import prunelab.schema  # noqa: F401
