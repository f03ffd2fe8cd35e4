"""MkDocs hook: the presets page's table, generated from conf/experiment/ when the site is built.

Each preset is composed as the command would compose it (`experiment=<name>`), so the table shows what a
run of it uses, inherited settings included.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

# Puts the typed schemas the configs build on in Hydra's ConfigStore (composing from CONF needs them).
import prunelab.schema  # noqa: F401

CONF = Path(__file__).resolve().parents[2] / "conf"
MARKER = "<!-- presets table -->"


def _choice(cfg, group: str) -> str:
    """The group's choice (`resnet56`), with the model's name for timm/torchvision backbones."""
    choice = str(OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") or "")
    name = OmegaConf.select(cfg, f"{group}.name") if group == "backbone" else None
    return f"{choice} ({name})" if name and str(name) != choice else choice


def _budget(cfg) -> str:
    budget = OmegaConf.to_container(cfg.budget, resolve=False)
    keys = ("flops", "params", "latency", "sparsity", "layer_ratios")
    return ", ".join(f"{k}={budget[k]}" for k in keys if budget.get(k) is not None)


def presets_table() -> str:
    """One row per preset: name, method, backbone, dataset, budget, the paper's figure and its source."""
    GlobalHydra.instance().clear()
    rows = ["| preset | method | backbone | dataset | budget | paper |", "|---|---|---|---|---|---|"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in sorted((CONF / "experiment").glob("*.yaml")):
            cfg = compose("config", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
            method = _choice(cfg, "method")
            paper = OmegaConf.select(cfg, "paper") or {}
            figure = f"{paper.get('acc')}% ({paper.get('source', '')})" if paper.get("acc") is not None else ""
            rows.append(
                f"| `{path.stem}` | {method} | {_choice(cfg, 'backbone')} | {_choice(cfg, 'dataset')} "
                f"| {_budget(cfg)} | {figure} |"
            )
    GlobalHydra.instance().clear()
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker on the presets page with the table."""
    return markdown.replace(MARKER, presets_table()) if MARKER in markdown else markdown
