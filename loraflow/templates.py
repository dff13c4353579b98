"""Prompt templates: how a record becomes one training text.

An instruction record {instruction, input, output} goes through the configured template (alpaca,
alpaca_zh, chat or a custom string). A conversation {messages: [...]} always goes through the tokenizer's
chat template (prompt.template must be `chat`): the prompt is every turn before the last assistant turn
plus the generation prompt, the completion is that last answer and its end-of-turn. Earlier assistant turns
are context, like the user turns: with train.completion_only_loss only the last answer is learnt.
"""

from __future__ import annotations

import re
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
PLACEHOLDER = re.compile(r"\{(instruction|input|output)\}")


def render(template: str, row: dict[str, Any], tokenizer: Any, with_output: bool = True) -> str:
    """The text for one row; with_output=False gives the prompt that generation continues from.

    Training texts end with the tokenizer's EOS token: without it the model never learns to stop.
    """
    if "messages" in row:
        return render_conversation(row["messages"], tokenizer, with_output)
    if template == "chat":
        return render_chat(row, tokenizer, with_output)
    pattern = NAMED_TEMPLATES.get(template, template)
    values = {"instruction": row["instruction"], "input": row.get("input", ""),
              "output": row["output"] if with_output else ""}
    # One pass over the template alone: a "{input}" or "{output}" written inside the data is text, never a
    # placeholder (chained str.replace would substitute it; str.format would trip on any brace).
    text = PLACEHOLDER.sub(lambda found: values[found.group(1)], pattern)
    return text + tokenizer.eos_token if with_output else text


def render_chat(row: dict[str, str], tokenizer: Any, with_output: bool) -> str:
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    messages = [{"role": "user", "content": user}]
    if not with_output:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": row["output"]})
    return close_with_eos(tokenizer.apply_chat_template(messages, tokenize=False), tokenizer.eos_token)


def render_conversation(messages: list[dict[str, str]], tokenizer: Any, with_output: bool) -> str:
    """A validated conversation (ends with the assistant's turn) through the tokenizer's chat template."""
    if not with_output:
        return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return close_with_eos(tokenizer.apply_chat_template(messages, tokenize=False), tokenizer.eos_token)


def close_with_eos(text: str, eos_token: str) -> str:
    """End the text at the EOS that closes the last turn, adding it where the template does not.

    ChatML writes "<|im_end|>\n" after each turn: the newline would be one more trained token after EOS
    (and TRL appends another EOS to a completion that does not end with one).
    """
    text = text.rstrip()
    return text if text.endswith(eos_token) else text + eos_token


def answer_of(row: dict[str, Any]) -> str:
    """The expected answer of a row: its output, or the conversation's last (assistant) turn."""
    return row["messages"][-1]["content"] if "messages" in row else row["output"]
