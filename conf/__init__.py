"""prunelab's Hydra configs. This file makes conf/ the package `prunelab.conf` of an installed copy
(see pyproject.toml), which Hydra reads as `pkg://prunelab.conf`; the configs themselves are YAML."""
