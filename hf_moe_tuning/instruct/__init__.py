"""Decoder-only MoE instruction tuning (the Mixtral-Instruct path) with TRL's ``SFTTrainer``.

* :mod:`.chat` – chat template for ``ByT5Tokenizer`` and chat-format conversion of the embedded data;
* :mod:`.sft` – ``MoESFTTrainer`` runs of the study (the MoE callbacks: freezing, router losses, expert load);
* :mod:`.evaluation` – rank classification / greedy generation of causal LMs in chat format;
* :mod:`.config` – ``instruct_moe`` recipe loading and offline validation (LoRA targets included);
* :mod:`.study` – :func:`run_instruct_study`, the four-arm dense vs MoE comparison.
"""

from .chat import BYTE_CHAT_TEMPLATE, CHATML_TEMPLATE, ensure_chat_template, render_prompt, to_prompt_completion
from .config import InstructStudyConfig, load_instruct_config, lora_config, parse_instruct_config, validate_instruct_config
from .evaluation import evaluate_chat_task
from .sft import SFTOutcome, align_special_tokens, build_sft_trainer, run_sft, sft_config
from .study import run_instruct_config, run_instruct_study

__all__ = [
    "BYTE_CHAT_TEMPLATE",
    "CHATML_TEMPLATE",
    "InstructStudyConfig",
    "SFTOutcome",
    "align_special_tokens",
    "build_sft_trainer",
    "ensure_chat_template",
    "evaluate_chat_task",
    "load_instruct_config",
    "lora_config",
    "parse_instruct_config",
    "render_prompt",
    "run_instruct_config",
    "run_instruct_study",
    "run_sft",
    "sft_config",
    "to_prompt_completion",
    "validate_instruct_config",
]
