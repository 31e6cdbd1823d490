"""Chat format for decoder-only models: a chat template for ``ByT5Tokenizer`` and dataset conversion.

``ByT5Tokenizer()`` (the byte tokenizer of every tiny model; it needs no files) ships no chat template,
so :data:`BYTE_CHAT_TEMPLATE` gives it a small one. Bytes are tokens, so the role markers are kept to
three characters::

    U: <user message>\\n
    A: <assistant message></s>

``S: <system message>\\n`` may come first. The assistant turn ends with the tokenizer's EOS token and is
wrapped in ``{% generation %}`` markers, so TRL's ``assistant_only_loss`` trains on the answer *and* on
the stop token; ``add_generation_prompt=True`` ends the prompt with ``"A: "``. Real models keep their
own template (:func:`ensure_chat_template` with ``mode="auto"``); a base checkpoint without one (e.g.
Mixtral-8x7B-v0.1) gets :data:`CHATML_TEMPLATE`.

The converters turn the embedded world's ``inputs``/``targets`` columns into TRL's conversational
prompt-completion format (``prompt=[{"role": "user", ...}]``, ``completion=[{"role": "assistant", ...}]``),
for which ``SFTTrainer`` computes the loss on the completion only.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

logger = logging.getLogger(__name__)

#: Chat template given to ``ByT5Tokenizer()`` (see the module docstring).
BYTE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'S: ' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'U: ' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'A: ' }}"
    "{%- generation -%}{{ message['content'] + eos_token }}{%- endgeneration -%}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}"
)

#: ChatML, for base checkpoints whose tokenizer has no chat template (markers are plain text there).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' + eos_token }}{%- endgeneration -%}{{ '\n' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

#: ``chat_template`` values of a recipe's ``sft`` section.
CHAT_TEMPLATE_MODES: tuple[str, ...] = ("auto", "model", "byte", "chatml")


def ensure_chat_template(tokenizer: Any, mode: str = "auto") -> Any:
    """Give ``tokenizer`` the chat template ``mode`` asks for and return it.

    * ``auto``: keep the tokenizer's own template; ``ByT5Tokenizer`` gets :data:`BYTE_CHAT_TEMPLATE`,
      any other tokenizer without one gets :data:`CHATML_TEMPLATE` (logged);
    * ``model``: the tokenizer's own template, an error if it has none;
    * ``byte`` / ``chatml``: set that template (replacing the tokenizer's own).
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template={mode!r} is not one of {list(CHAT_TEMPLATE_MODES)}")
    own = getattr(tokenizer, "chat_template", None)
    is_byte = type(tokenizer).__name__.startswith("ByT5")
    if mode == "model":
        if not own:
            raise ValueError(
                f"chat_template='model' but {type(tokenizer).__name__} has no chat template; use 'auto', 'byte' or 'chatml'"
            )
        return tokenizer
    if mode == "auto":
        if own:
            return tokenizer
        mode = "byte" if is_byte else "chatml"
        if not is_byte:
            logger.warning("%s has no chat template; using ChatML", type(tokenizer).__name__)
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE if mode == "byte" else CHATML_TEMPLATE
    return tokenizer


def user_prompt(text: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversational prompt of one example: an optional system message and the user turn."""
    prompt = [{"role": "system", "content": system}] if system else []
    return prompt + [{"role": "user", "content": text}]


def to_prompt_completion(dataset: Dataset, system: str | None = None) -> Dataset:
    """``inputs``/``targets`` columns -> TRL's conversational ``prompt``/``completion`` columns (others dropped)."""
    missing = {"inputs", "targets"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"expected 'inputs' and 'targets' columns, missing {sorted(missing)} in {dataset.column_names}")

    def convert(example: dict) -> dict:
        return {
            "prompt": user_prompt(example["inputs"], system),
            "completion": [{"role": "assistant", "content": example["targets"]}],
        }

    return dataset.map(convert, remove_columns=dataset.column_names)


def render_prompt(tokenizer: Any, text: str, system: str | None = None) -> str:
    """The chat-formatted prompt string of ``text`` ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(user_prompt(text, system), tokenize=False, add_generation_prompt=True)


def text_dataset(dataset: Dataset, column: str = "text") -> Dataset:
    """A plain language-modeling dataset (one ``text`` column) for causal-LM pretraining."""
    if column not in dataset.column_names:
        raise ValueError(f"expected a {column!r} column, got {dataset.column_names}")
    extra = [c for c in dataset.column_names if c != column]
    dataset = dataset.remove_columns(extra) if extra else dataset
    return dataset.rename_column(column, "text") if column != "text" else dataset


# ------------------------------------------------------------------------------------------ SFT runs
#: Keys of a recipe's ``sft`` section that are not ``SFTConfig`` fields.
OWN_SFT_KEYS: frozenset[str] = frozenset({"chat_template", "system", "lora", "accelerate_config"})
#: Config fields the pipeline sets itself (from the stage's output folder and seed), not the recipe.
_MANAGED = ("output_dir", "seed", "data_seed")
#: Defaults of every SFT stage on top of the study's stage defaults: bf16 and activation checkpointing off
#: (TRL turns both on; they fail on a CPU without bf16 or only cost time for tiny models; real recipes set them).
SFT_DEFAULTS: dict[str, Any] = {"bf16": False, "activation_checkpointing": False, "logging_steps": 25, "dataloader_pin_memory": False}
#: transformers 5.x's deprecated spellings and their names (removed in v6); a recipe may still use either.
_DEPRECATED_ARGS: dict[str, str] = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _current_names(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with transformers' deprecated argument names replaced by their current ones.

    Raises:
        ValueError: both spellings of one argument, with different values.
    """
    out = dict(options)
    for old, new in _DEPRECATED_ARGS.items():
        if old in out:
            value = out.pop(old)
            if new in out and out[new] != value:
                raise ValueError(f"{old}={value!r} and {new}={out[new]!r} set one argument twice; keep {new!r}")
            out[new] = value
    return out


def sft_config(args: dict[str, Any], output_dir: str, seed: int = 0, sft_options: dict[str, Any] | None = None) -> Any:
    """The :class:`~hf_moe_tuning.sft.MoESFTConfig` of one SFT run: :data:`SFT_DEFAULTS`, then ``args``
    (``SFTConfig`` and ``moe_*`` fields), then ``sft_options`` (the recipe's ``sft`` section). transformers'
    deprecated ``gradient_checkpointing*`` names are read as ``activation_checkpointing*``.

    Raises:
        ValueError: a key that is no ``MoESFTConfig`` field, or a value its validators reject (names the field).
    """
    import dataclasses

    from ..sft import MoESFTConfig

    kwargs = {**SFT_DEFAULTS, **_current_names(args), **_current_names(sft_options or {})}
    for key in _MANAGED:
        kwargs.pop(key, None)
    kwargs.setdefault("report_to", "none")
    names = {f.name for f in dataclasses.fields(MoESFTConfig)}
    unknown = sorted(k for k in kwargs if k not in names)
    if unknown:
        raise ValueError(f"unknown training argument {unknown[0]!r}: not a MoESFTConfig (SFTConfig or moe_*) field")
    return MoESFTConfig(output_dir=str(output_dir), seed=seed, data_seed=seed, **kwargs)


def lora_config(lora: dict[str, Any], sparse: bool):
    """A ``peft.LoraConfig`` from the recipe's ``sft.lora`` for a sparse (MoE) or dense model.

    Attention modules are targeted in every model; MLP modules (``dense_target_modules``) in dense
    models; the fused expert tensors (``expert_parameters``, through PEFT's ``target_parameters``) in MoE models.
    """
    from peft import LoraConfig

    kwargs = {k: v for k, v in lora.items() if k not in ("target_modules", "dense_target_modules", "expert_parameters")}
    modules = list(lora["target_modules"]) + ([] if sparse else list(lora.get("dense_target_modules", [])))
    params = list(lora.get("expert_parameters", [])) if sparse else []
    return LoraConfig(task_type="CAUSAL_LM", target_modules=modules, target_parameters=params or None, **kwargs)


def align_special_tokens(model: Any, tokenizer: Any) -> Any:
    """Make ``model``'s config and generation config use the tokenizer's EOS and PAD ids (returns ``model``).

    The tiny decoder configs carry Llama's ids (bos 1, eos 2); ``ByT5Tokenizer`` has eos 1 and pad 0, so
    generation would never stop without this.
    """
    for cfg in (model.config.get_text_config(), model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    if getattr(tokenizer, "bos_token_id", None) is None:
        model.config.get_text_config().bos_token_id = None
        model.generation_config.bos_token_id = None
    return model
