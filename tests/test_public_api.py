"""The public API is what the README lists, and the README's "Use it" examples run as written (equal-length rows: the plain example uses the default collator)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import ByT5Tokenizer, TrainingArguments

import hf_moe_tuning
from hf_moe_tuning.models import build_tiny_model

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _use_it_blocks() -> list[str]:
    section = README.split("## Use it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_all_is_the_readme_api_table():
    table = README.split("<!-- API -->", 1)[1].split("<!-- /API -->", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_]+)`", table)) - {"Trainer", "SFTTrainer", "trl"}
    assert set(hf_moe_tuning.__all__) | {"MoESFTConfig", "MoESFTTrainer"} == listed
    assert len(hf_moe_tuning.__all__) <= 20
    for name in hf_moe_tuning.__all__:
        assert getattr(hf_moe_tuning, name) is not None
    for internal in ("build_tiny_model", "build_moe_callbacks", "load_checkpoint_exact", "FusedResumeMixin", "MoECardMixin"):
        assert internal not in hf_moe_tuning.__all__


def _seq2seq_data() -> Dataset:
    tokenizer = ByT5Tokenizer()
    rows = [{"input_ids": tokenizer(f"question {i}")["input_ids"], "labels": tokenizer("yes" if i % 2 else "not")["input_ids"]}
            for i in range(8)]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("index", range(len(_use_it_blocks())))
def test_readme_use_it_examples_run(index, tmp_path, monkeypatch):
    from hf_moe_tuning.study.chat import align_special_tokens, ensure_chat_template

    monkeypatch.chdir(tmp_path)
    code = _use_it_blocks()[index]
    namespace: dict = {}
    if "MoESFT" in code:
        tokenizer = ensure_chat_template(ByT5Tokenizer(), "byte")
        namespace.update(
            model=align_special_tokens(build_tiny_model("mixtral"), tokenizer), tokenizer=tokenizer,
            chat_ds=Dataset.from_list([{"prompt": [{"role": "user", "content": f"say {i}"}],
                                        "completion": [{"role": "assistant", "content": str(i)}]} for i in range(8)]),
        )
    else:
        namespace.update(model=build_tiny_model("switch"), ds=_seq2seq_data(),
                         args=TrainingArguments("plain", max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True))
    # the examples train with library defaults; keep every run to a couple of steps on the tiny data
    code = code.replace('"out",', '"out", max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,'
                                  ' moe_drift_probe_size=0,')
    exec(compile(code, f"README.md Use it block {index}", "exec"), namespace)
