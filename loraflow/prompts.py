"""Prompts and the eval split: every row rendered with the template (EOS appended), a seeded eval set split off.

Every row becomes a prompt (where generation starts) and a completion (the answer and EOS). With
train.completion_only_loss the loss is on the completions only: for a conversation, its last assistant
turn (see loraflow/templates.py).

Nothing is dropped, cut or called held-out silently. Before a tokenizer is needed (`plan_rows`): a field that holds
data and that the template or the record shape does not use stops the run; too few rows for an eval split stop it;
eval rows identical to training rows are removed and counted (all of them: the run stops); the label set must have
2 to 20 labels. With the tokenizer (`build_prompts`): every training example's length in tokens is measured as TRL
tokenizes it; one longer than model.max_seq_length would have its answer cut off, so it is left out and counted
(all of them: the run stops); the prompt's tokens must be the first tokens of prompt + answer; the chat template
must exist where it is used. Errors are ConfigError / DatasetError (exit 2); what a user must know is in
`Prompts.notes`.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from loraflow.config import BUILTIN_TEMPLATES, DataConfig, InferSettings, ModelConfig, PromptConfig
from loraflow.errors import ConfigError, DatasetError
from loraflow.logs import run_logger
from loraflow.models import resolve_model
from loraflow.templates import answer_of, render
from loraflow.data import CHAT_FIELDS, Dataset, shortened
from loraflow.store import Store

MAX_LABELS = 20  # more distinct answers than this is free text, not a label set


@dataclass(frozen=True)
class EvalExample:
    """One prompt smoke-infer generates for, with the answer it expects (None for infer.prompts)."""

    prompt: str  # the template up to the response, where generation starts
    answer: str | None  # the expected output (None for infer.prompts); a conversation's last assistant turn
    instruction: str  # "" for a conversation
    input: str  # a conversation's last user turn


@dataclass(frozen=True)
class Prompts:
    """The prompt set of a run: training texts split into prompt and completion, eval and smoke-test prompts."""

    train_prompts: list[str]  # the template up to the response
    train_completions: list[str]  # the response and EOS; prompt + completion is the training text
    eval_examples: list[EvalExample]
    infer_prompts: list[EvalExample]  # from infer.prompts, rendered the same way
    labels: list[str] | None  # the closed label set, when the outputs form one
    eos_token: str
    why_no_labels: str | None = None  # what keeps the eval outputs from forming a label set; None when they do
    num_too_long: int = 0  # training examples left out: longer than model.max_seq_length (their answers would be cut)
    longest_tokens: int = 0  # the longest training example kept, in tokens (0: not measured)
    num_eval_copies: int = 0  # eval rows removed for being identical to a training row
    notes: list[str] = field(default_factory=list)  # what the user must know about the data, one sentence each

    @property
    def train_texts(self) -> list[str]:
        return [p + c for p, c in zip(self.train_prompts, self.train_completions)]

    def to_json(self) -> bytes:
        """UTF-8 JSON of every field: what a training process started elsewhere reads (see store_prompts)."""
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Prompts":
        fields = json.loads(raw)
        for name in ("eval_examples", "infer_prompts"):
            fields[name] = [EvalExample(**example) for example in fields[name]]
        return cls(**fields)


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the first round(n × fraction) rows (at least 1 when fraction > 0) are held out."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    held_out = 0 if fraction == 0 else max(1, round(len(shuffled) * fraction))
    held_out = min(held_out, len(shuffled) - 1)  # keep at least one row to train on
    return shuffled[held_out:], shuffled[:held_out]


def why_no_label_set(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> str | None:
    """What keeps the eval outputs from forming a closed label set, in words; None when they form one.

    A label set: 2 to MAX_LABELS distinct training answers (stripped), each at least twice, and every eval answer
    one of them. One label is no label set: a model that always gives it scores 1.0, which measures nothing."""
    counts = Counter(answer_of(row).strip() for row in train_rows)
    if not eval_rows:
        return "there are no eval rows to score"
    if len(counts) == 1:
        (label,) = counts
        return f"every training output is {label!r}: one label is not a label set (a model that always answers it scores 1.0)"
    if len(counts) > MAX_LABELS:
        return f"the training outputs take {len(counts)} distinct values (free text; a label set has at most {MAX_LABELS})"
    once = sorted(label for label, count in counts.items() if count < 2)
    if once:
        return (f"{len(once)} training output(s) occur only once (e.g. {shortened(once[0], 60)!r}); every label must "
                "occur at least twice")
    outside = sorted({answer_of(row).strip() for row in eval_rows} - set(counts))
    if outside:
        return f"eval output {outside[0]!r} is not among the training outputs"
    return None


def label_like_outputs(train_rows: list[dict[str, Any]]) -> list[str]:
    """The distinct training answers (stripped) when there are few enough to be labels (at most MAX_LABELS), even
    when they do not form a closed label set (a variant seen once is one reason they may not); else []."""
    distinct = sorted({answer_of(row).strip() for row in train_rows})
    return distinct if len(distinct) <= MAX_LABELS else []


def look_alike_labels(labels: list[str]) -> list[list[str]]:
    """Groups of labels that are one word written differently: the same after Unicode NFKC normalisation (full-width
    to ASCII), accents removed and case folded ('Positive', 'positive', 'ｐｏｓｉｔｉｖｅ', 'posítive')."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", label))
        key = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
        groups.setdefault(key, []).append(label)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def closed_label_set(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> list[str] | None:
    """The labels, when the outputs form a closed label set (see why_no_label_set); else None (no accuracy)."""
    if why_no_label_set(train_rows, eval_rows) is not None:
        return None
    return sorted({answer_of(row).strip() for row in train_rows})


def row_identity(row: dict[str, Any]) -> str:
    """A row as compared for copies: every field with its runs of whitespace made one space and trimmed, Unicode
    NFKC-normalised (full-width to ASCII) and case-folded, so an eval row that is a training row retyped ("The  park",
    "the park") is found as the copy it is."""
    if "messages" in row:
        return json.dumps([(m["role"], comparable_text(m["content"])) for m in row["messages"]], ensure_ascii=False)
    return json.dumps([comparable_text(row[name]) for name in ("instruction", "input", "output")], ensure_ascii=False)


def comparable_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def template_fields(template: str, dataset: Dataset) -> tuple[str, ...]:
    """The record fields a run renders: a conversation's turns; an instruction record's fields the template names
    (the built-in templates and `chat` use all three)."""
    if dataset.is_chat:
        return CHAT_FIELDS
    if template in BUILTIN_TEMPLATES:
        return ("instruction", "input", "output")
    return tuple(name for name in ("instruction", "input", "output") if "{" + name + "}" in template)


def check_fields_used(template: str, datasets: list[Dataset], ignore_fields: list[str]) -> None:
    """Every field that holds data is rendered into the prompts, or named in data.ignore_fields.

    An error rather than a warning: a template without {input} turns a classifier's training set into its
    instruction alone, and a column spelled differently ('Input', 'context') is read as no input at all; a run is
    often unattended, and a warning is read after the adapter is pushed. Raises DatasetError naming the file, the
    field, how many rows hold data in it, and the two fixes."""
    for dataset in datasets:
        used = template_fields(template, dataset)
        unused = {name: count for name, count in dataset.field_counts.items()
                  if count and name not in used and name not in ignore_fields}
        if not unused:
            continue
        rows = len(dataset.rows)
        name = "input" if "input" in unused else next(iter(unused))  # the template's own field first: the likelier slip
        count = unused[name]
        others = f" (and {', '.join(repr(n) for n in unused if n != name)})" if len(unused) > 1 else ""
        if name == "input" and not dataset.is_chat:
            raise DatasetError(
                f"{dataset.uri}: field 'input' holds data in {count} of {rows} rows{others}, and prompt.template has no "
                "{input}: every row's input would be left out of its prompt. Add {input} to the template, or list "
                "'input' in data.ignore_fields to train without it"
            )
        shape = "a chat record uses " + "/".join(CHAT_FIELDS) if dataset.is_chat else (
            f"prompt.template uses {', '.join(used)}")
        raise DatasetError(
            f"{dataset.uri}: field {name!r} holds data in {count} of {rows} rows{others}, and nothing reads it ({shape}): "
            "its text would never reach the model. Rename it to a field the template uses, or list it in "
            "data.ignore_fields to leave it out on purpose"
        )


@dataclass(frozen=True)
class RowPlan:
    """What format-prompts decides before it needs a tokenizer: which rows train, which are scored, the labels."""

    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]  # copies of training rows removed
    num_eval_copies: int  # eval rows removed for being identical to a training row
    labels: list[str] | None
    why_no_labels: str | None
    num_answers_trimmed: int = 0  # training answers that had whitespace around them, trained without it
    first_trimmed: str | None = None  # the first of them as it was in the file


def trim_answers(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, str | None]:
    """The rows with the spaces and line breaks around each answer (an output, a conversation's last turn) removed;
    how many answers had any, and the first as it was. Answers are scored stripped (labels, accuracy), so an answer
    trained as ' negative' or 'positive\n' teaches a token the scorer never looks for: the leading space changes the
    answer's first token, the reason a template with whitespace before {output} is refused (config.PromptConfig)."""
    trimmed: list[dict[str, Any]] = []
    changed, first = 0, None
    for row in rows:
        answer = answer_of(row)
        if answer == answer.strip():
            trimmed.append(row)
            continue
        changed, first = changed + 1, first if first is not None else answer
        if "messages" in row:
            messages = row["messages"][:-1] + [{**row["messages"][-1], "content": answer.strip()}]
            trimmed.append({**row, "messages": messages})
        else:
            trimmed.append({**row, "output": answer.strip()})
    return trimmed, changed, first


def plan_rows(train: Dataset, eval_dataset: Dataset | None, prompt: PromptConfig, data: DataConfig) -> RowPlan:
    """Check the rows against the template and split them, before any tokenizer or model loads.

    Raises ConfigError (chat records with another template) or DatasetError: a field nothing reads, too few rows
    for an eval split, or every eval row a copy of a training row (nothing would be held out). Eval rows that are
    copies of training rows (compared after stripping, as labels are) are removed and counted: scoring the model
    on what it trained on measures memory, not what it learnt."""
    datasets = [train] + ([eval_dataset] if eval_dataset else [])
    check_template_fits(prompt.template, datasets)
    check_fields_used(prompt.template, datasets, data.ignore_fields)
    if eval_dataset is not None:
        train_rows, eval_rows = train.rows, eval_dataset.rows
    else:
        if data.eval_fraction > 0 and len(train.rows) < 2:
            raise DatasetError(
                f"{train.uri}: {len(train.rows)} row is too few for an eval split (data.eval_fraction "
                f"{data.eval_fraction:g}): at least 2 rows are needed, 1 held out and 1 to train on, and far more for "
                "an accuracy that means anything. Add rows, give data.eval_uri, or set data.eval_fraction: 0"
            )
        train_rows, eval_rows = split_rows(train.rows, data.eval_fraction, data.seed)
    seen = {row_identity(row) for row in train_rows}
    kept = [row for row in eval_rows if row_identity(row) not in seen]
    copies = len(eval_rows) - len(kept)
    if eval_rows and not kept:
        where = (f"{eval_dataset.uri}: all {copies} eval rows are copies of rows in {train.uri} (the same file?)"
                 if eval_dataset is not None else
                 f"{train.uri}: all {copies} rows held out for eval (data.eval_fraction {data.eval_fraction:g}) are copies "
                 f"of training rows: the file holds {len(seen | {row_identity(r) for r in eval_rows})} distinct rows "
                 f"among {len(train.rows)}")
        raise DatasetError(f"{where}; nothing would be held out, and an accuracy on them would measure memory. Remove "
                           "the repeated rows, or give data.eval_uri rows the model does not train on")
    why_not = why_no_label_set(train_rows, kept)
    labels = None if why_not else closed_label_set(train_rows, kept)
    train_rows, num_trimmed, first_trimmed = trim_answers(train_rows)
    return RowPlan(train_rows, kept, copies, labels, why_not, num_trimmed, first_trimmed)


def check_template_fits(template: str, datasets: list[Dataset]) -> None:
    """Conversations render only through the tokenizer's chat template: a configured one must say so."""
    chat = [dataset.uri for dataset in datasets if dataset.is_chat]
    if chat and template != "chat":
        shown = template if template in ("alpaca", "alpaca_zh") else "a custom template"
        raise ConfigError(
            f"prompt.template: {chat[0]} holds chat records (messages), which render with the model's chat "
            f"template, but prompt.template is {shown}; set prompt.template: chat"
        )


def split_text(template: str, row: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """(prompt, completion) of one row: the whole text must begin with the prompt that generation starts from."""
    prompt = render(template, row, tokenizer, with_output=False)
    text = render(template, row, tokenizer)
    if not text.startswith(prompt):  # a chat template that renders a turn differently once it is answered
        raise ConfigError(
            "prompt.template: the rendered training text does not begin with the rendered prompt, so the answer "
            f"cannot be split off (prompt ends {prompt[-60:]!r}, text there reads {text[max(0, len(prompt) - 60) : len(prompt)]!r})"
        )
    return prompt, text[len(prompt) :]


def example_of(template: str, row: dict[str, Any], tokenizer: Any, answer: str | None) -> EvalExample:
    prompt = render(template, row, tokenizer, with_output=False)
    if "messages" in row:
        return EvalExample(prompt, answer, "", row["messages"][-2]["content"])
    return EvalExample(prompt, answer, row["instruction"], row.get("input", ""))


def load_tokenizer(model_name: str, revision: str | None) -> Any:
    """The model's tokenizer (no weights). Raises ConfigError when there is none to load (no such folder or Hub
    model); a network failure stays what it was, so a task retries it."""
    from transformers import AutoTokenizer

    from loraflow.retries import is_transient

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model_name), revision=revision)
    except OSError as exc:  # transformers and huggingface_hub raise OSError subclasses for a model they cannot find
        if is_transient(exc):
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"model.name: cannot load the tokenizer of {model_name}: {first_line}"
        if "couldn't connect" in first_line.lower():  # the Hub is down or unreachable, not a wrong name
            raise ConnectionError(message) from None
        raise ConfigError(message) from None


def check_chat_template(template: str, datasets: list[Dataset], tokenizer: Any, model_name: str) -> None:
    """prompt.template chat (and chat records) render with the tokenizer's chat template: it must have one.
    Raises ConfigError naming prompt.template and the model."""
    if (template == "chat" or any(d.is_chat for d in datasets)) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"prompt.template: chat renders with the tokenizer's chat template, and the tokenizer of {model_name} has "
            "none (a base model, not an instruct one); use alpaca, alpaca_zh or a custom template with "
            "instruction records, or a model with a chat template"
        )


def token_lengths(tokenizer: Any, prompts: list[str], texts: list[str]) -> tuple[list[int], list[int]]:
    """Each text's length in tokens as TRL tokenizes it (`tokenizer(text)`, special tokens included), and the
    indices of the examples whose prompt tokens are not the first tokens of prompt + completion (where TRL warns
    of a mismatch and its completion mask is off)."""
    text_ids = tokenizer(texts)["input_ids"]
    prompt_ids = tokenizer(prompts)["input_ids"]
    split = [i for i, (head, whole) in enumerate(zip(prompt_ids, text_ids)) if whole[: len(head)] != head]
    return [len(ids) for ids in text_ids], split


def build_prompts(
    train: Dataset,
    eval_dataset: Dataset | None,
    prompt: PromptConfig,
    data: DataConfig,
    infer: InferSettings,
    tokenizer: Any,
    model: ModelConfig | None = None,
) -> Prompts:
    """Rows -> training texts, eval prompts with expected answers, and the smoke-test prompts; logs nothing.

    With `model`, every training example is measured in tokens: one longer than model.max_seq_length is left out
    (TRL would cut its answer off, or drop it when the prompt alone fills the length) and counted in the notes.
    Raises ConfigError (no chat template, a template whose prompt ends inside the answer's first token) or
    DatasetError (see plan_rows; every training example too long)."""
    plan = plan_rows(train, eval_dataset, prompt, data)
    datasets = [train] + ([eval_dataset] if eval_dataset else [])
    model_name = model.name if model else getattr(tokenizer, "name_or_path", "the model")
    check_chat_template(prompt.template, datasets, tokenizer, model_name)
    texts = [split_text(prompt.template, row, tokenizer) for row in plan.train_rows]
    notes: list[str] = []
    if plan.num_eval_copies:
        notes.append(
            f"{plan.num_eval_copies} of {plan.num_eval_copies + len(plan.eval_rows)} eval rows were copies of training "
            f"rows and were removed; {len(plan.eval_rows)} held-out rows remain"
        )
    lengths, split_inside = token_lengths(tokenizer, [head for head, _ in texts], [h + t for h, t in texts])
    if split_inside:
        head, tail = texts[split_inside[0]]
        raise ConfigError(
            f"prompt.template: in {len(split_inside)} of {len(texts)} training examples the prompt's last token and "
            f"the answer's first merge into one (prompt ends {head[-20:]!r}, answer starts {tail[:12]!r}), so the "
            "answer cannot be split off at a token boundary; end the prompt with a newline or a character the answer "
            "cannot join"
        )
    too_long = {i for i, n in enumerate(lengths) if model is not None and n > model.max_seq_length}
    if too_long and len(too_long) == len(texts):
        raise DatasetError(
            f"{train.uri}: all {len(texts)} training examples are longer than model.max_seq_length "
            f"{model.max_seq_length} tokens (shortest {min(lengths)}, longest {max(lengths)}): their answers would be "
            f"cut off and nothing could be trained; set model.max_seq_length: {max(lengths)} (or shorten the examples)"
        )
    if too_long:
        notes.append(
            f"{len(too_long)} of {len(texts)} training examples are longer than model.max_seq_length "
            f"{model.max_seq_length} tokens (the longest: {max(lengths)}) and were left out, since their answers would "
            f"be cut off; set model.max_seq_length: {max(lengths)} to train on them"
        )
        texts = [pair for i, pair in enumerate(texts) if i not in too_long]
    if plan.num_answers_trimmed:
        notes.append(
            f"{plan.num_answers_trimmed} of {len(plan.train_rows)} training answers had spaces or line breaks around "
            f"them (the first: {shortened(plan.first_trimmed or '', 40)!r}); they are trained without them, as every "
            "answer is scored without them"
        )
    if plan.why_no_labels and plan.eval_rows:
        notes.append(f"eval accuracy is not measured: {plan.why_no_labels}")
    notes += [f"labels {' and '.join(repr(label) for label in group)} differ only in case, width or accents: they are "
              "trained and scored as different labels, each answer right for one of them only; write them one way"
              for group in look_alike_labels(label_like_outputs(plan.train_rows))]
    return Prompts(
        train_prompts=[head for head, _ in texts],
        train_completions=[tail for _, tail in texts],
        eval_examples=[example_of(prompt.template, row, tokenizer, answer_of(row).strip()) for row in plan.eval_rows],
        infer_prompts=[
            example_of(prompt.template, {"instruction": p.instruction, "input": p.input}, tokenizer, None)
            for p in infer.prompts
        ],
        labels=plan.labels,
        eos_token=tokenizer.eos_token,
        why_no_labels=plan.why_no_labels,
        num_too_long=len(too_long),
        longest_tokens=max((n for i, n in enumerate(lengths) if i not in too_long), default=0),
        num_eval_copies=plan.num_eval_copies,
        notes=notes,
    )


def format_prompts(
    train: Dataset,
    eval_dataset: Dataset | None,
    prompt: PromptConfig,
    data: DataConfig,
    infer: InferSettings,
    tokenizer: Any,
    model: ModelConfig | None = None,
) -> Prompts:
    """build_prompts, with what it found in the run's log: each note as a warning. Raises what build_prompts raises."""
    prompts = build_prompts(train, eval_dataset, prompt, data, infer, tokenizer, model)
    log = run_logger()
    log.info(
        "format-prompts: %d train texts, %d eval examples, %d smoke prompts, labels=%s",
        len(prompts.train_prompts), len(prompts.eval_examples), len(prompts.infer_prompts), prompts.labels,
    )
    for note in prompts.notes:
        log.warning("format-prompts: %s", note)
    return prompts


def prompts_key(prompts: Prompts) -> str:
    """The prompt set's key in the store: `prompts/<sha256 of its JSON>.json`, the same for the same prompts."""
    return f"prompts/{hashlib.sha256(prompts.to_json()).hexdigest()}.json"


def store_prompts(store: Store, prompts: Prompts) -> str:
    """Put the prompt set in the store under prompts_key (writing it again is harmless); returns the key."""
    key = prompts_key(prompts)
    store.put_bytes(prompts.to_json(), key)
    return key


def load_prompts(store: Store, key: str) -> Prompts:
    """The prompt set store_prompts wrote under `key`. Raises FileNotFoundError when it is not there."""
    return Prompts.from_json(store.read_bytes(key))
