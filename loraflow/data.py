"""Reading and validating datasets: training records from a file, S3, HTTP or the Hub, every row checked.

Three record shapes, told apart by the first record and then required of every row:
- instruction: {instruction, input, output} (the notebook's; `input` optional)
- chat: {messages: [{role, content}, ...]} with roles system (first only), user, assistant
- ShareGPT: {conversations: [{from, value}, ...]} with from system, human, gpt
Chat turns alternate user/assistant after an optional system turn and end with the assistant's.

A bad dataset fails here, before any model is loaded, with one message naming the file, the row and the
field. The rows that come out are plain dicts {instruction, input, output} of strings, or, for both chat
shapes, {messages: [{role, content}, ...]} with roles system/user/assistant. Fields a record has beyond those are
not carried in the rows, but counted (`Dataset.field_counts`), so format-prompts can refuse to drop data silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraflow.errors import DatasetError

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input",)
CHAT_FIELDS = ("messages", "conversations")  # a column of either makes a Parquet file a chat dataset
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Dataset:
    uri: str
    rows: list[dict[str, Any]]
    sha256: str  # of the bytes read (for a Hub dataset: of its rows as canonical JSON lines)
    # every top-level field of the records as read -> how many rows hold data in it (a non-blank value), including
    # fields the rows above leave out: what the template or the record shape does not use is found from these
    field_counts: dict[str, int] = field(default_factory=dict)
    etag: str | None = None  # an S3 object's ETag, from the same GET as the bytes (quotes stripped); else None

    @property
    def is_chat(self) -> bool:
        """Rows are conversations {messages: [...]} rather than instruction records."""
        return bool(self.rows) and "messages" in self.rows[0]


def read_dataset(uri: str) -> Dataset:
    """Read and validate the dataset at `uri`: rows in one of the shapes above, and the sha256 of what was read.

    Raises DatasetError (unreadable, malformed: names the file, row and field), ConnectionError (an endpoint that
    cannot be reached: transient, a task retries it).
    """
    etag = None
    if uri.startswith("s3://"):
        (raw, etag), name = read_s3(uri), uri
    elif uri.startswith(("http://", "https://")):
        raw, name = read_http(uri), uri
    elif not Path(uri).exists() and HUB_ID.match(uri):
        return read_hub_dataset(uri)
    else:
        raw, name = read_local(uri), uri
    records = parse_records(raw, name)
    return Dataset(uri=uri, rows=validate_rows(records, name), sha256=hashlib.sha256(raw).hexdigest(),
                   field_counts=count_fields(records), etag=etag)


# --- reading bytes -----------------------------------------------------------------------------------------


def no_such_file(path: str) -> str:
    """A relative path is read from the working directory (not the config's folder): say which one that was."""
    return f"{path}: no such file" + ("" if Path(path).is_absolute() else f" (relative to {Path.cwd()})")


def read_local(path: str) -> bytes:
    file = Path(path).expanduser()  # `~/data/train.json`, as a folder URI is read
    if file.is_dir():  # data.uri's folders are resolved to their newest file before this; data.eval_uri's are not
        raise DatasetError(f"{path}: is a folder; name a data file here (only data.uri takes a folder: its newest file)")
    if not file.is_file():
        raise DatasetError(no_such_file(path))
    return file.read_bytes()


def read_s3(uri: str) -> tuple[bytes, str]:
    """The object's bytes and its ETag (quotes stripped), from one GET."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from loraflow.s3 import s3_client, split_s3_uri
    from loraflow.s3_store import CREDENTIAL_ERRORS

    bucket, key = split_s3_uri(uri)
    client = s3_client()
    endpoint = client.meta.endpoint_url
    try:
        got = client.get_object(Bucket=bucket, Key=key)
        return got["Body"].read(), got["ETag"].strip('"')
    except client.exceptions.NoSuchKey:
        raise DatasetError(f"{uri}: no such object at S3 endpoint {endpoint}") from None
    except client.exceptions.NoSuchBucket:
        raise DatasetError(f"{uri}: no such bucket {bucket!r} at S3 endpoint {endpoint}") from None
    except NoCredentialsError:
        raise DatasetError(f"{uri}: no AWS credentials to read it: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "or LORAFLOW_AWS_CREDENTIALS_BLOCK") from None
    except EndpointConnectionError as exc:
        # still a ConnectionError, so the task retries it; the CLI prints it as one line
        raise ConnectionError(f"{uri}: cannot reach S3 endpoint {endpoint}: {exc}") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in CREDENTIAL_ERRORS:
            raise DatasetError(f"{uri}: S3 endpoint {endpoint} refused to read it ({code}); check AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY and the bucket's policy") from None
        raise


def read_http(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "loraflow"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise  # transient: the task retries it
        raise DatasetError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:  # no answer at all; still a ConnectionError, so the task retries it
        raise ConnectionError(f"{url}: cannot reach it: {exc.reason}") from None


def read_hub_dataset(dataset_id: str) -> Dataset:
    """`owner/name` that is no local path: a Hugging Face Hub dataset (or a mistyped path: both are said)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DatasetError(f"{no_such_file(dataset_id)}, and as a Hub dataset id it cannot be fetched: the Hub "
                           "is offline (HF_HUB_OFFLINE=1)")
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split="train")
    except FileNotFoundError:  # datasets' DatasetNotFoundError: the Hub answered, there is no such dataset
        raise DatasetError(f"{no_such_file(dataset_id)}, and no such dataset on the Hugging Face Hub") from None
    except ConnectionError as exc:  # still a ConnectionError, so the task retries it; the CLI prints one line
        raise ConnectionError(f"{no_such_file(dataset_id)}, and the Hugging Face Hub could not be reached to "
                              f"fetch a dataset of that name ({exc})") from None
    records = [(f"row {i}", record) for i, record in enumerate(loaded, start=1)]
    rows = validate_rows(records, dataset_id)
    canonical = "\n".join(json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows).encode()
    return Dataset(uri=dataset_id, rows=rows, sha256=hashlib.sha256(canonical).hexdigest(),
                   field_counts=count_fields(records))


# --- parsing -----------------------------------------------------------------------------------------------


def suffix_of(name: str) -> str:
    path = urlparse(name).path if "://" in name else name
    return Path(path).suffix.lower()


def parse_records(raw: bytes, name: str) -> list[tuple[str, Any]]:
    """Bytes -> [(where, record)], `where` being how an error should point at the record."""
    suffix = suffix_of(name)
    if suffix == ".parquet":
        return parse_parquet(raw, name)
    if suffix not in SUPPORTED_SUFFIXES:
        raise DatasetError(f"{name}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name}: not UTF-8 (invalid byte at offset {exc.start})") from None
    if suffix == ".jsonl":
        return parse_jsonl(text, name)
    if suffix == ".csv":
        return parse_csv(text, name)
    return parse_json(text, name)


class RepeatedKey(ValueError):
    """A JSON object that names one key twice: json.loads would keep the last value without a word."""


def object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a dict, or RepeatedKey naming the first key given twice."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise RepeatedKey(key)
        seen[key] = value
    return seen


def load_json(text: str) -> Any:
    """json.loads that refuses an object with a repeated key (RepeatedKey) instead of keeping its last value."""
    return json.loads(text, object_pairs_hook=object_without_repeats)


def parse_json(text: str, name: str) -> list[tuple[str, Any]]:
    try:
        loaded = load_json(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{name}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RepeatedKey as exc:
        raise DatasetError(f"{name}: a record names the key {exc.args[0]!r} twice; JSON readers keep only the last value, so "
                           "one of them would be lost: keep one") from None
    if not isinstance(loaded, list):
        raise DatasetError(
            f"{name}: expected a JSON array of records [{{instruction, input, output}}, ...], got {a_json_type(loaded)}"
        )
    return [(f"row {i}", record) for i, record in enumerate(loaded, start=1)]


def parse_jsonl(text: str, name: str) -> list[tuple[str, Any]]:
    records = []
    # Records end at "\n" only: str.splitlines() would also split inside a string at U+2028, U+0085 and the like,
    # which JSON allows there unescaped (json.dumps(..., ensure_ascii=False) writes them so).
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", load_json(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}: line {lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        except RepeatedKey as exc:
            raise DatasetError(f"{name}: line {lineno}: the key {exc.args[0]!r} is given twice; JSON readers keep only the last "
                               "value, so one of them would be lost: keep one") from None
    return records


def parse_csv(text: str, name: str) -> list[tuple[str, Any]]:
    """Every data row must have exactly the header's number of fields.

    A field with an unquoted comma splits in two: csv.DictReader hands the first values to the header's columns and
    files the rest under a key of None, so the text after the comma becomes the next column (the label ' dark')
    and the real label is lost. Raises DatasetError naming the row, its line, both counts and the hint to quote.
    """
    # Python's csv refuses a field over 131,072 characters; a long field is no malformed row (the token-length
    # checks say what is too long for max_seq_length), so the limit is the text's own length.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text))
    try:
        return csv_records(reader, name)
    except csv.Error as exc:
        raise DatasetError(f"{name}: line {reader.line_num}: not valid CSV: {exc}") from None


def csv_records(reader: Any, name: str) -> list[tuple[str, Any]]:
    """The rows of `reader` (a csv.reader at the file's start) keyed by the header; see parse_csv."""
    header = next(reader, [])
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:  # dict(zip(...)) would keep the last column of the name and lose the others without a word
        columns = "; ".join(f"{column!r} is columns {', '.join(str(i + 1) for i, c in enumerate(header) if c == column)}"
                            for column in repeated)
        raise DatasetError(f"{name}: the CSV header names a column twice ({columns}); only one column of a name can "
                           "be read: rename or remove the others")
    missing = [field for field in REQUIRED_FIELDS if field not in header]
    if missing:
        raise DatasetError(f"{name}: CSV header has no column {', '.join(repr(m) for m in missing)} (found: {header})")
    records = []
    for values in reader:
        if not values:  # a blank line is no row (csv.DictReader skips them too)
            continue
        # Row numbers count data rows from 1; reader.line_num is the file line where this row ends.
        where = f"row {len(records) + 1} (line {reader.line_num})"
        if len(values) != len(header):
            read_as = " | ".join(repr(shortened(value)) for value in values)
            raise DatasetError(
                f"{name}: {where}: {len(values)} fields, but the header has {len(header)} ({', '.join(header)}); "
                f"read as {read_as}. Put a field that contains commas in double quotes: ...,\"small, dark, and cold\",..."
            )
        records.append((where, dict(zip(header, values))))
    return records


def shortened(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_parquet(raw: bytes, name: str) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DatasetError(f"{name}: not a readable Parquet file ({exc})") from None
    missing = [field for field in REQUIRED_FIELDS if field not in table.column_names]
    if missing and not any(field in table.column_names for field in CHAT_FIELDS):
        raise DatasetError(f"{name}: Parquet file has no column {', '.join(repr(m) for m in missing)}")
    return [(f"row {i}", record) for i, record in enumerate(table.to_pylist(), start=1)]


# --- validation --------------------------------------------------------------------------------------------


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def a_json_type(value: Any) -> str:
    """json_type with its article: 'an object', 'a string', 'null'."""
    name = json_type(value)
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def check_encodable(text: str, where: str, field: str) -> None:
    """Raises DatasetError when `text` holds an unpaired surrogate (JSON's "\\ud800" without its pair, common in
    scraped text with a broken emoji): no tokenizer can encode it, and it would fail deep in training."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetError(f"{where}: field '{field}' holds an unpaired surrogate ({text[exc.start]!r} at character "
                           f"{exc.start + 1}), which is no Unicode text: remove it or restore its pair") from None


def holds_data(value: Any) -> bool:
    """A value that means something: not null, not blank text, not an empty array or object."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, dict)):
        return bool(value)
    return True


def count_fields(records: list[tuple[str, Any]]) -> dict[str, int]:
    """Top-level field -> how many records hold data in it (records that are not objects count for nothing)."""
    counts: dict[str, int] = {}
    for _, record in records:
        if isinstance(record, dict):
            for key, value in record.items():
                counts[str(key)] = counts.get(str(key), 0) + holds_data(value)
    return counts


def validate_rows(records: list[tuple[str, Any]], name: str) -> list[dict[str, Any]]:
    if not records:
        raise DatasetError(f"{name}: the dataset has no rows")
    shape = record_shape(records[0][1])
    if shape in TURN_KEYS:
        return [validate_chat_row(record, f"{name}: {where}", shape) for where, record in records]
    return [validate_row(record, f"{name}: {where}") for where, record in records]


def record_shape(record: Any) -> str:
    """'messages', 'conversations' (ShareGPT) or 'instruction': the first record decides for the whole file."""
    if isinstance(record, dict):
        for field in CHAT_FIELDS:
            if field in record:
                return field
    return "instruction"


def validate_row(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object with instruction, input, output; got {a_json_type(record)}")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise DatasetError(f"{where}: field '{field}' is missing")
    row = {}
    for field in ("instruction", "input", "output"):
        value = record.get(field)
        if value is None and field in OPTIONAL_FIELDS:
            value = ""
        if not isinstance(value, str):
            raise DatasetError(f"{where}: field '{field}' must be a string, got {json_type(value)}")
        if field in REQUIRED_FIELDS and not value.strip():
            raise DatasetError(f"{where}: field '{field}' is blank")
        check_encodable(value, where, field)
        row[field] = value
    return row


# Per chat shape: the keys of a turn, and each accepted speaker name -> the role it means.
TURN_KEYS = {"messages": ("role", "content"), "conversations": ("from", "value")}
SPEAKERS = {
    "messages": {"system": "system", "user": "user", "assistant": "assistant"},
    "conversations": {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
}


def speaker_name(shape: str, role: str) -> str:
    """How `shape` spells a role, for error messages: 'gpt' in ShareGPT, 'assistant' in messages."""
    return next(name for name, meant in SPEAKERS[shape].items() if meant == role)


def validate_chat_row(record: Any, where: str, shape: str) -> dict[str, list[dict[str, str]]]:
    """One conversation -> {messages: [{role, content}]}; every turn checked, then the order of the turns."""
    role_key, text_key = TURN_KEYS[shape]
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object with '{shape}' (a chat record); got {a_json_type(record)}")
    if shape not in record:
        raise DatasetError(f"{where}: field '{shape}' is missing (the first row is a chat record, so every row must be)")
    turns = record[shape]
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: field '{shape}' must be a non-empty array of {{{role_key}, {text_key}}} "
                           f"objects, got {'an empty array' if turns == [] else json_type(turns)}")
    messages = []
    for index, turn in enumerate(turns):
        field = f"{shape}[{index}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: field '{field}' must be an object with '{role_key}' and '{text_key}', "
                               f"got {json_type(turn)}")
        for key in (role_key, text_key):
            if key not in turn:
                raise DatasetError(f"{where}: field '{field}.{key}' is missing")
        extra = [key for key in turn if key not in (role_key, text_key)]
        if extra:  # e.g. OpenAI's per-turn "weight": 0 means "do not train on this turn", which loraflow would not honour
            raise DatasetError(f"{where}: field '{field}' has key(s) {', '.join(repr(k) for k in extra)} besides "
                               f"'{role_key}' and '{text_key}'; loraflow reads no other turn key, so they would be "
                               "ignored: remove them")
        speaker, content = turn[role_key], turn[text_key]
        if speaker not in SPEAKERS[shape]:
            raise DatasetError(f"{where}: field '{field}.{role_key}' is {speaker!r}; expected one of "
                               f"{', '.join(repr(name) for name in SPEAKERS[shape])}")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: field '{field}.{text_key}' must be a string, got {json_type(content)}")
        if not content.strip():
            raise DatasetError(f"{where}: field '{field}.{text_key}' is blank")
        check_encodable(content, where, f"{field}.{text_key}")
        messages.append({"role": SPEAKERS[shape][speaker], "content": content})
    check_turn_order(messages, where, shape)
    return {"messages": messages}


def check_turn_order(messages: list[dict[str, str]], where: str, shape: str) -> None:
    """An optional system turn first, then user and assistant alternating, ending with the assistant."""
    role_key = TURN_KEYS[shape][0]
    first = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[first:], start=first):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DatasetError(
                f"{where}: field '{shape}[{index}].{role_key}' is {speaker_name(shape, message['role'])!r}; expected "
                f"{speaker_name(shape, expected)!r} (an optional system turn first, then "
                f"{speaker_name(shape, 'user')} and {speaker_name(shape, 'assistant')} alternate)"
            )
    if messages[-1]["role"] != "assistant":
        last = len(messages) - 1
        raise DatasetError(
            f"{where}: field '{shape}[{last}].{role_key}': the last turn must be from "
            f"{speaker_name(shape, 'assistant')!r} (its answer is what the model learns), not "
            f"{speaker_name(shape, messages[-1]['role'])!r}"
        )
