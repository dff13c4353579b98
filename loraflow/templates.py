"""Prompt templates: how a record {instruction, input, output} becomes one training text."""

from __future__ import annotations

from typing import Any

ALPACA = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{instruction}

### Input:
{input}

### Response:
{output}"""

# The classic Unsloth notebook's Chinese translation of the Alpaca prompt.
ALPACA_ZH = """以下是描述任务的指令，搭配的输入提供了进一步的上下文。请编写一个适当完成请求的响应。

### 指令:
{instruction}

### 输入:
{input}

### 响应:
{output}"""

NAMED_TEMPLATES = {"alpaca": ALPACA, "alpaca_zh": ALPACA_ZH}


def render(template: str, row: dict[str, str], tokenizer: Any, with_output: bool = True) -> str:
    """The text for one row; with_output=False gives the prompt that generation continues from.

    Training texts end with the tokenizer's EOS token: without it the model never learns to stop.
    """
    if template == "chat":
        return render_chat(row, tokenizer, with_output)
    pattern = NAMED_TEMPLATES.get(template, template)
    # str.format would trip on braces inside user text; replace the three placeholders only.
    text = pattern.replace("{instruction}", row["instruction"]).replace("{input}", row.get("input", ""))
    if not with_output:
        return text.replace("{output}", "")
    return text.replace("{output}", row["output"]) + tokenizer.eos_token


def render_chat(row: dict[str, str], tokenizer: Any, with_output: bool) -> str:
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    messages = [{"role": "user", "content": user}]
    if not with_output:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": row["output"]})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    # Chat templates usually close the assistant turn with EOS already; add it only where they do not.
    return text if text.rstrip().endswith(tokenizer.eos_token) else text + tokenizer.eos_token
