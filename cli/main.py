"""`loraflow run`: validate the config and the data, then run the finetune flow. `loraflow store gc|verify`:
maintain the artifact store (loraflow/store_gc.py, loraflow/store_verify.py). `loraflow warm-pool`: keep a
process with the backend imported for a process worker's next flow run (loraflow/warm.py).

Exit codes: 0 success; 2 invalid usage, config or data (last stderr line `error: ...`, no traceback,
nothing loaded); 1 any other failure (for `store verify`: a missing or corrupt object).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(EXIT_INPUT, f"{self.prog}: {message}")


def fail(code: int, message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="loraflow", description="LoRA/QLoRA fine-tuning as a Prefect flow.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    run = commands.add_parser("run", help="run the finetune flow once, here")
    run.add_argument("--config", help="YAML config (see deployments/configs/)")
    run.add_argument("--dataset", help="training data URI (data.uri)")
    run.add_argument("--eval-dataset", help="eval data URI (data.eval_uri)")
    run.add_argument("--model", help="model name or path (model.name)")
    run.add_argument("--output", help="output folder (output.dir)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config key; repeatable; the value is read as YAML")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config, data, prompts and output folder, say what would be trained, and stop "
                          "(no Prefect, no model weights)")
    aliases = commands.add_parser("aliases", help="list a model line's aliases and the history of every move")
    aliases.add_argument("--store", required=True, help="the store (output.store): a folder or s3://bucket/prefix")
    aliases.add_argument("--line", help="the model line (promote.line); without it, the lines in the store")
    aliases.add_argument("--json", action="store_true", help="print aliases/<line>.json as it is")
    aliases.add_argument("--plot", metavar="PNG", help="also write the line's accuracy by run to this PNG file")
    promote = commands.add_parser("promote", help="point an alias of a model line at a published adapter, by hand")
    promote.add_argument("--store", required=True, help="the store (output.store): a folder or s3://bucket/prefix")
    promote.add_argument("--line", required=True, help="the model line (promote.line)")
    promote.add_argument("--adapter", required=True, help="the adapter's store key, adapters/<key> (or an alias to copy)")
    promote.add_argument("--alias", default="production", help="the alias to move (default production)")
    promote.add_argument("--reason", default="", help="why, for the history")
    webhook = commands.add_parser("webhook", help="the dataset-upload webhook receiver")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True, parser_class=ArgumentParser)
    serve = webhook_commands.add_parser("serve", help="receive S3/SNS/MinIO upload notifications; emit Prefect events")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8787)
    warm = commands.add_parser("warm-pool", help="keep a process with the backend imported for the next flow run of "
                                                 "a process worker (deployments run python -m loraflow.warm_start)")
    warm.add_argument("--socket", help="Unix socket path (default $LORAFLOW_WARM_SOCKET, else "
                                       "/tmp/loraflow-warm-<uid>.sock)")
    warm.add_argument("--backend", default="auto", choices=("auto", "unsloth", "transformers"),
                      help="what the spare imports: auto = Unsloth on CUDA where installed, else transformers")
    add_store_commands(commands)
    return parser


def add_store_commands(commands: Any) -> None:
    from loraflow.store_gc import GcPolicy

    defaults = GcPolicy()
    store = commands.add_parser("store", help="maintain the artifact store")
    store_commands = store.add_subparsers(dest="store_command", required=True, parser_class=ArgumentParser)
    gc = store_commands.add_parser(
        "gc", help="delete what nothing references: marks now, deletes what an earlier pass marked >= grace ago")
    verify = store_commands.add_parser("verify", help="re-hash every object a manifest lists; exit 1 if any is "
                                                      "missing or corrupt")
    for command in (gc, verify):
        command.add_argument("--store", default=".loraflow/store", help="a local folder or s3://bucket/prefix "
                             "(default: .loraflow/store, output.store's default)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be deleted and marked; change nothing")
    gc.add_argument("--grace-hours", type=float, default=defaults.grace_hours,
                    help="least time between marking and deleting; least age of an orphan blob or a cut-short upload "
                         "(default %(default)s; 0 = one pass, only when nothing writes to the store)")
    gc.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints,
                    help="checkpoints kept per train key whose adapter is published (default %(default)s)")
    gc.add_argument("--retention-days", type=float, default=defaults.retention_days,
                    help="summaries and Prefect results older than this go; a kept summary keeps its adapter "
                         "(default %(default)s)")
    gc.add_argument("--candidate-retention-days", type=float, default=defaults.candidate_retention_days,
                    help="adapters published longer ago that no alias and no kept summary points at go "
                         "(default %(default)s)")


def overrides_from(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run's options as config overrides, in order. Raises ConfigError for an option given empty."""
    from loraflow.config import parse_assignment
    from loraflow.errors import ConfigError

    for option in ("dataset", "eval_dataset", "model", "output"):
        if getattr(args, option) is not None and not getattr(args, option).strip():
            # left out, the config's own value would be used without a word: `--dataset "$DATA"` with DATA unset
            raise ConfigError(f"--{option.replace('_', '-')} is empty (an unset shell variable?): give a value, or "
                              "leave the option out to use the config's")
    named = {
        "data": {k: v for k, v in (("uri", args.dataset), ("eval_uri", args.eval_dataset)) if v},
        "model": {"name": args.model} if args.model else {},
        "output": {"dir": args.output} if args.output else {},
    }
    return [{section: values} for section, values in named.items() if values] + [parse_assignment(s) for s in args.set]


def preflight(cfg: Any) -> Any:
    """Everything that can be wrong with the input, found before Prefect starts or a model loads (loraflow.preflight);
    returns the prompt set the run will train on."""
    from loraflow.preflight import check_inputs

    return check_inputs(cfg)


def print_plan(cfg: Any, prompts: Any) -> None:
    """What a run of `cfg` would train on and score (--dry-run), with the notes a run would record."""
    from loraflow.batching import memorisation_note, passes_over_data
    from loraflow.quality import FEW_SCORED

    from loraflow.sources import newest_object

    trained = len(prompts.train_prompts)
    print("dry run: the input is valid; nothing was trained and no model weights were loaded")
    source = newest_object(cfg.data.uri)
    print(f"data: {source.uri}" + (f" (the newest data file under {source.source})" if source.from_folder else ""))
    print(f"train: {trained} examples"
          + (f" ({prompts.num_too_long} longer than model.max_seq_length left out)" if prompts.num_too_long else "")
          + f", the longest kept {prompts.longest_tokens} tokens (model.max_seq_length {cfg.model.max_seq_length}); "
          f"each seen {passes_over_data(cfg.train, trained):.3g} times")
    scored = min(len(prompts.eval_examples), cfg.infer.max_eval_examples) if prompts.labels else 0
    print(f"eval: {len(prompts.eval_examples)} held-out examples"
          + (f" ({prompts.num_eval_copies} copies of training rows removed)" if prompts.num_eval_copies else "")
          + (f", {scored} scored on labels {', '.join(prompts.labels)}" if scored else ", no accuracy"))
    notes = prompts.notes + [memorisation_note(cfg.train, trained)]
    if 0 < scored < FEW_SCORED:
        notes.append(f"only {scored} examples will be scored: an accuracy on fewer than {FEW_SCORED} is a rough guide "
                     "(its 95% interval is printed beside it)")
    for note in filter(None, notes):
        print(f"note: {note}")


def print_result(summary: Any) -> None:
    """The run in a few lines, from its RunSummary."""
    from loraflow.summary import LOSS_CURVE_FILE, SUMMARY_FILE

    print("\nsmoke-infer answers:")
    for item in summary.smoke_answers:
        expected = "" if item.expected is None else f"   (expected {item.expected})"
        print(f"  {item.input or '-'} -> {item.answer}{expected}")
    if summary.accuracy_line:
        print(f"eval accuracy: {summary.accuracy_line}")
    print(f"train loss: {summary.train_loss_first:.4f} -> {summary.train_loss_last:.4f} in {summary.train_steps} steps "
          f"on {summary.num_train_examples} examples (each seen {summary.passes_over_data:g} times)")
    if summary.promotion and summary.promotion.decision != "off":
        print(f"promotion ({summary.promotion.line}, {summary.promotion.alias}): {summary.promotion.decision}: "
              f"{summary.promotion.reason}")
    print(f"adapter saved to: {summary.adapter_dir}")
    print(f"summary: {os.path.join(summary.adapter_dir, SUMMARY_FILE)}")
    print(f"loss curve: {os.path.join(summary.adapter_dir, LOSS_CURVE_FILE)}")
    for run in summary.tracker_runs:
        print(f"{run['tracker']}: {run['url'] or run['run_id']}")
    if summary.hub_url:
        print(f"pushed to: {summary.hub_url} ({summary.hub_revision}{', tag ' + summary.hub_tag if summary.hub_tag else ''})")
    for note in summary.notes:
        print(f"note: {note}")


def run_command(args: argparse.Namespace) -> int:
    from loraflow.config import load_config
    from loraflow.errors import LoraflowInputError, StoreUnavailableError
    from loraflow.retries import is_transient
    from loraflow.temporary_server import EarlyServer, start_temporary_server_early

    try:
        cfg = load_config(args.config, overrides_from(args))
        server = EarlyServer() if args.dry_run else start_temporary_server_early()  # boots while we check
        try:
            prompts = preflight(cfg)
        except BaseException:
            server.abandon()  # silently: the error below must be the run's last line
            raise
    except LoraflowInputError as exc:
        fail(EXIT_INPUT, str(exc))
    except StoreUnavailableError as exc:
        fail(EXIT_FAILED, str(exc))
    except Exception as exc:
        if not is_transient(exc):
            raise  # a bug: the traceback is the useful report
        fail(EXIT_FAILED, str(exc))  # the network failed while reading the input (the dataset's endpoint is down)
    if args.dry_run:
        print_plan(cfg, prompts)
        return EXIT_OK

    from flows.finetune import finetune

    server.ready()  # started in a session of its own: a Ctrl-C / SIGTERM to this run must not take it first
    state = finetune(config=cfg, return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        code = EXIT_INPUT if isinstance(exc, LoraflowInputError) else EXIT_FAILED
        fail(code, f"flow run {state.name}: {exc}")
    print_result(state.result())
    return EXIT_OK


def aliases_command(args: argparse.Namespace) -> int:
    """`loraflow aliases`: where each alias of a line points and every move, newest first; or the lines there are."""
    import time

    from loraflow.aliases import ALIASES_PREFIX, read_aliases
    from loraflow.errors import LoraflowInputError
    from loraflow.store import open_store

    try:
        store = open_store(args.store)
        if not args.line:
            lines = sorted(key.rsplit("/", 1)[-1].removesuffix(".json") for key in store.list_files(ALIASES_PREFIX)
                           if key.endswith(".json"))
            print("\n".join(lines) if lines else f"no model lines in {store.uri}")
            return EXIT_OK
        record = read_aliases(store, args.line)
    except LoraflowInputError as exc:
        fail(EXIT_INPUT, str(exc))
    if args.json:
        print(record.to_json().decode(), end="")
    else:
        stamp = lambda at: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))  # noqa: E731
        print(f"line {record.line} in {store.uri}")
        for name, target in sorted(record.aliases.items()):
            print(f"  {name:<12} {target.adapter_key}   since {stamp(target.at)} UTC, by {target.by}")
        print("history (newest first):")
        for entry in reversed(record.history):
            accuracy = entry.scores.get("challenger_accuracy")
            print(f"  {stamp(entry.at)}  {entry.alias:<12} -> {entry.adapter_key}  {entry.decision or ''}"
                  f"{'' if accuracy is None else f'  accuracy {accuracy:.4f}'}  {entry.reason}")
    if args.plot:
        from pathlib import Path

        from loraflow.report import line_history_png

        Path(args.plot).write_bytes(line_history_png(record, "production"))
        print(f"plot: {args.plot}")
    return EXIT_OK


def promote_command(args: argparse.Namespace) -> int:
    """`loraflow promote`: move an alias by hand (recorded in the history as a manual move by user@host)."""
    from loraflow.aliases import promote_by_hand, read_aliases
    from loraflow.config import ALIAS_NAME
    from loraflow.errors import LoraflowInputError
    from loraflow.store import open_store

    try:
        store = open_store(args.store)
        if not ALIAS_NAME.match(args.alias):
            raise LoraflowInputError(f"--alias {args.alias!r}: lower-case letters, digits, - and _, starting with a letter")
        adapter = args.adapter
        if ALIAS_NAME.match(adapter):  # another alias: copy where it points
            adapter = read_aliases(store, args.line).target(adapter) or fail(
                EXIT_INPUT, f"alias {args.adapter!r} of line {args.line} points nowhere")
        before = read_aliases(store, args.line).target(args.alias)
        promote_by_hand(store, args.line, args.alias, adapter, args.reason)
    except LoraflowInputError as exc:
        fail(EXIT_INPUT, str(exc))
    print(f"{args.line}: {args.alias} -> {adapter} (was {before or 'unset'})")
    return EXIT_OK


def webhook_command(args: argparse.Namespace) -> int:
    from loraflow.webhook import WebhookSettings, serve

    try:
        settings = WebhookSettings.from_env()  # a settings error ends here in one line, before uvicorn starts
    except ValueError as exc:
        fail(EXIT_INPUT, str(exc))
    serve(settings, args.host, args.port)
    return EXIT_OK


def warm_pool_command(args: argparse.Namespace) -> int:
    import logging

    from loraflow.warm import run_pool

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        run_pool(args.socket, args.backend)
    except ValueError as exc:
        fail(EXIT_INPUT, str(exc))
    except RuntimeError as exc:
        fail(EXIT_FAILED, str(exc))
    return EXIT_OK


def store_command(args: argparse.Namespace) -> int:
    from loraflow.errors import LoraflowInputError, StoreDataError, StoreUnavailableError

    try:
        if args.store_command == "gc":
            from loraflow.store_gc import GcPolicy, collect_garbage

            policy = GcPolicy(args.grace_hours, args.keep_checkpoints, args.retention_days, args.candidate_retention_days)
            print("\n".join(collect_garbage(args.store, policy, dry_run=args.dry_run).lines()))
            return EXIT_OK
        from loraflow.store_verify import verify_store

        report = verify_store(args.store)
    except LoraflowInputError as exc:
        fail(EXIT_INPUT, str(exc))
    except (StoreUnavailableError, StoreDataError, OSError) as exc:
        fail(EXIT_FAILED, str(exc))
    print("\n".join(report.lines()))
    if not report.ok:
        fail(EXIT_FAILED, f"{len(report.findings)} objects listed by manifests in {report.store} are missing or corrupt")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server's first start migrates a fresh database; on a busy 2-core box that can outlast
    # Prefect's 20 s default, which fails the run before it begins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_command(args)
    if args.command == "webhook":
        return webhook_command(args)
    if args.command == "store":
        return store_command(args)
    if args.command == "warm-pool":
        return warm_pool_command(args)
    if args.command == "aliases":
        return aliases_command(args)
    if args.command == "promote":
        return promote_command(args)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
