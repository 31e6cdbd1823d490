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
