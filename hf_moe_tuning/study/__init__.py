"""Studies reproducing the seed papers' findings on the embedded world (tiny) or Hub models (real).

* :func:`compare` – Flan-MoE: T5 vs Flan-T5 vs MoE vs Flan-MoE fine-tuned on held-out tasks;
* :func:`ablate` – ST-MoE: fine-tune with the five freezing strategies;
* :func:`sweep_experts` – Switch: fewer vs more experts;
* :func:`load_study_config` / :class:`ConfigError` – recipe YAML loading and validation.
"""

from .cache import StageCache, config_hash
from .config import ConfigError, StudyConfig, load_study_config, parse_study_config, validate_training_args
from .report import render
from .runner import ablate, compare, run_study, sweep_experts

__all__ = [
    "ConfigError",
    "StageCache",
    "StudyConfig",
    "ablate",
    "compare",
    "config_hash",
    "load_study_config",
    "parse_study_config",
    "run_study",
    "sweep_experts",
    "validate_training_args",
    "render",
]
