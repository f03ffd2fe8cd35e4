"""Runs a method's stages in order; a stage whose output exists is skipped, so a killed run resumes.

A method's stages may hold `Rounds`, blocks repeated for rounds (train -> prune -> rewind); they are
expanded here into one flat list, in which every stage has its own directory (`stages/<i>-<name>`,
or `stages/r<round>-<j>-<name>` inside a round) and is skipped when its `done.json` exists. Each
completed stage leaves its model, the method's state and its metrics, so a resumed run continues
with exactly what the interrupted one had.

The modules, from the top down: `experiment` (`run`), `runners` (one stage of each kind), `trainer`
(a stage's Lightning Trainer and checkpoints), `stages` (the stage list and the checks before any
work), `context` (what the stages share, rewinding), and the leaves `build` (objects from the config),
`record` (the run directory's record of deciding settings), `finish` (the final figures), `logs` and
`table` (what a run prints).
"""

from prunelab.pipeline.build import build
from prunelab.pipeline.context import Context
from prunelab.pipeline.experiment import run
from prunelab.pipeline.logs import quiet_logs
from prunelab.pipeline.record import EXPERIMENT_FILE, experiment_differences, experiment_record
from prunelab.pipeline.runners import prune_stage
from prunelab.pipeline.stages import check_data, plan_stages

__all__ = [
    "EXPERIMENT_FILE",
    "Context",
    "build",
    "check_data",
    "experiment_differences",
    "experiment_record",
    "plan_stages",
    "prune_stage",
    "quiet_logs",
    "run",
]
