"""Promotion: the new adapter (the challenger) against the adapter the line's `production` alias points at (the
champion), scored on the same eval examples by the same rule; the alias moves only on evidence.

The rule, in order (`decide`):
1. smoke-infer refused the answers, or the quality gate (hub.*) failed: refused; the run fails anyway.
2. no champion yet: the quality gate decides alone (passed, or none configured: promoted, and the reason says which).
3. the champion is this adapter (a rerun on unchanged inputs): kept, nothing moves.
4. no accuracy (the eval outputs are no closed label set): refused, nothing to compare.
5. the challenger's accuracy must exceed the champion's, by at least promote.min_improvement;
6. with promote.require_significance, McNemar's exact test on the paired per-example correctness must give
   p < promote.alpha (loraflow/significance.py).

The champion is scored on the challenger's eval examples (the first infer.max_eval_examples of this run's eval set:
a fixed data.eval_uri keeps every run on the same examples; without it the run's own split is used, which the
champion may have trained on, and the report says the comparison is weaker). When the challenger's live model is
in this process, the champion's adapter is loaded beside it onto the same base weights (PEFT `load_adapter` +
`set_adapter`) instead of loading the base model again; else the base and the champion adapter are loaded from the
store. The champion's per-example labels are kept in the store under `comparisons/<key>.json`, so a rerun on
unchanged inputs loads no model.

Every challenger that got scored moves the `candidate` alias; a promoted one also moves `production` (one write,
two history entries). Promotions and refusals by comparison emit the Prefect events `loraflow.promotion.made` /
`loraflow.promotion.refused` (resource `loraflow.line.<line>`, the numbers in the payload), which the automations in
infra/automations/ turn into notifications; a refusal already notified for the same challenger and champion is not
sent again (a nightly run on unchanged data).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from loraflow.aliases import LineAliases, move_aliases, read_aliases
from loraflow.backends import LiveModel, load_adapter, take_trained
from loraflow.config import FinetuneConfig, PromoteSettings
from loraflow.fingerprint import stable_hash
from loraflow.inference import InferResult, example_labels, scored_examples
from loraflow.logs import run_logger
from loraflow.prompts import EvalExample, Prompts
from loraflow.significance import PairedTest, paired_test
from loraflow.store import Store, open_store
from loraflow.training import AdapterRef

CANDIDATE_ALIAS = "candidate"
EVENT_MADE = "loraflow.promotion.made"
EVENT_REFUSED = "loraflow.promotion.refused"
CHAMPION_ADAPTER_NAME = "champion"
COMPARISON_VERSION = 1
WEAKER_NOTE = ("the eval examples are this run's own split (no data.eval_uri): the champion may have trained on some "
               "of them, so the comparison is weaker than on a fixed eval set")

Decision = Literal["promoted", "refused", "kept", "off"]


class Promotion(BaseModel):
    """What the promote step decided and why, with the numbers. Accuracies are fractions of `eval_examples` (0..1)."""

    line: str
    alias: str
    decision: Decision
    reason: str
    challenger_key: str
    champion_key: str | None = None
    challenger_accuracy: float | None = None
    champion_accuracy: float | None = None
    improvement: float | None = None  # challenger - champion
    min_improvement: float = 0.0
    require_significance: bool = True
    test: PairedTest | None = None  # McNemar's exact test, when both were scored
    eval_examples: int = 0
    eval_source: str = ""  # "data.eval_uri <uri>" or "this run's split of <uri>"
    comparison_note: str | None = None  # why the comparison is weaker, when it is
    champion_scored_by: str | None = None  # "second adapter on the live base" | "base + adapter from the store" | ...
    champion_seconds: float | None = None  # wall time of scoring the champion
    aliases_moved: list[str] = []
    event: str | None = None  # the Prefect event emitted, if any
    repeat: bool = False  # this challenger was refused against this champion before (nothing moved, nobody told)
    champion_since: float | None = None  # when the champion became production (epoch s)

    @property
    def promoted(self) -> bool:
        """The challenger is production now (promoted now, or kept because it already was)."""
        return self.decision in ("promoted", "kept")

    def scores(self) -> dict[str, Any]:
        """The numbers for the alias history and the event payload."""
        test = self.test
        return {
            "challenger_accuracy": self.challenger_accuracy, "champion_accuracy": self.champion_accuracy,
            "improvement": self.improvement, "eval_examples": self.eval_examples,
            "test": test.name if test else None, "p_value": test.p_value if test else None,
            "challenger_only_right": test.challenger_only if test else None,
            "champion_only_right": test.champion_only if test else None,
        }


def decide(
    settings: PromoteSettings, failures: list[str], challenger_accuracy: float | None,
    champion_accuracy: float | None, test: PairedTest | None, has_champion: bool, is_champion: bool,
    gate_on: bool = True,
) -> tuple[Decision, str]:
    """The decision and its reason, by the rule in the module docstring (pure: no I/O).

    `failures` are smoke-infer's refusal and the quality gate's failures; `test` is None when there is no champion;
    `gate_on`: hub.min_eval_accuracy or hub.require_beat_base is set (the reason says when nothing was checked)."""
    if failures:
        return "refused", "; ".join(failures)
    if not has_champion:
        if not gate_on or challenger_accuracy is None:
            return "promoted", ("no champion yet, and no quality gate checked this adapter (set hub.min_eval_accuracy "
                                "or hub.require_beat_base for one): the first adapter of the line is promoted as it is")
        return "promoted", "no champion yet: the quality gate decides alone, and it passed"
    if is_champion:
        return "kept", f"this adapter is already {settings.alias}"
    if challenger_accuracy is None or champion_accuracy is None or test is None:
        return "refused", "eval accuracy was not measured (no closed label set): nothing to compare with the champion"
    improvement = challenger_accuracy - champion_accuracy
    numbers = f"challenger {challenger_accuracy:.4f} vs champion {champion_accuracy:.4f} on {test.n} examples"
    if improvement <= 0:
        return "refused", f"{numbers}: does not beat the champion"
    if improvement < settings.min_improvement:
        return "refused", f"{numbers}: +{improvement:.4f} < promote.min_improvement {settings.min_improvement:g}"
    if settings.require_significance and not test.significant:
        return "refused", f"{numbers}: +{improvement:.4f} is not significant: {test.describe()}"
    significance = f"; {test.describe()}" if settings.require_significance else " (promote.require_significance off)"
    return "promoted", f"{numbers}: +{improvement:.4f}{significance}"


def correct(labels: list[str | None], expected: list[str]) -> list[bool]:
    """Per example, whether the label it counted as is the expected answer (same order, same length)."""
    return [label == answer for label, answer in zip(labels, expected)]


def comparison_key(champion_digest: str, examples: list[EvalExample], labels: list[str], cfg: FinetuneConfig) -> str:
    """Where the champion's labels on these examples are kept: they depend on the champion's bytes, the examples,
    the label set, the scoring rule and the base model; nothing else."""
    scoring = cfg.infer.model_dump(mode="json", include={"label_scoring", "max_new_tokens"})
    return f"comparisons/v{COMPARISON_VERSION}-" + stable_hash(
        champion_digest, [(e.prompt, e.answer) for e in examples], labels, scoring, cfg.model.name,
        cfg.model.revision, cfg.model.load_in_4bit, cfg.model.dtype) + ".json"


def champion_on_live(live: LiveModel, store: Store, champion_key: str, examples: list[EvalExample],
                     labels: list[str], cfg: FinetuneConfig) -> list[str | None]:
    """The champion's labels, its adapter loaded beside the challenger's on the same live base model (PEFT's
    load_adapter + set_adapter), then removed again: the base weights are not loaded a second time."""
    model = live.model
    active = model.active_adapter
    with tempfile.TemporaryDirectory(prefix="loraflow-champion-") as folder:
        store.get_folder(champion_key, Path(folder))
        model.load_adapter(folder, adapter_name=CHAMPION_ADAPTER_NAME, is_trainable=False)
    try:
        model.set_adapter(CHAMPION_ADAPTER_NAME)
        live.backend.prepare_for_inference(live)
        return example_labels(live, examples, labels, cfg.infer)
    finally:
        model.set_adapter(active)
        model.delete_adapter(CHAMPION_ADAPTER_NAME)


def champion_labels(live: LiveModel | None, store: Store, champion_key: str, examples: list[EvalExample],
                    labels: list[str], cfg: FinetuneConfig, backend: str) -> tuple[list[str | None], str, float]:
    """The champion's label for each example, how it was scored, and the seconds it took: from the store when these
    examples were scored for this champion before, else on the live model, else base + champion loaded afresh."""
    started = time.perf_counter()
    key = comparison_key(store.digest(champion_key), examples, labels, cfg)
    stored, _ = store.read_versioned(key)
    if stored:
        return json.loads(stored)["labels"], "stored comparison (no model loaded)", time.perf_counter() - started
    if live is not None:
        found, how = champion_on_live(live, store, champion_key, examples, labels, cfg), "second adapter on the live base"
    else:
        champion = load_adapter(cfg.model, backend, store.uri, champion_key)
        champion.backend.prepare_for_inference(champion)
        found, how = example_labels(champion, examples, labels, cfg.infer), "base + champion adapter loaded from the store"
    store.put_bytes(json.dumps({"champion": champion_key, "labels": found}, ensure_ascii=False).encode(), key)
    return found, how, time.perf_counter() - started


def already_refused(record: LineAliases, challenger_key: str, champion_key: str | None) -> bool:
    """The history already holds a refusal of this challenger against this champion (notified then)."""
    return any(entry.alias == CANDIDATE_ALIAS and entry.adapter_key == challenger_key and entry.decision == "refused"
               and entry.details.get("champion_key") == champion_key for entry in record.history)


def promote(cfg: FinetuneConfig, backend: str, adapter: AdapterRef, inferred: InferResult, prompts: Prompts,
            summary: Any) -> Promotion:
    """Decide whether the run's adapter becomes the line's promote.alias, move the aliases, emit the event.

    `summary` is the run's RunSummary (dataset, gate, parent): its facts go into the alias history. Returns the
    Promotion; raises what the store raises (retried by the task when transient)."""
    live = take_trained(adapter.key)  # the challenger's live model, when a step of this process kept it
    settings, line = cfg.promote, cfg.line
    examples = scored_examples(prompts, cfg.infer)
    expected = [e.answer for e in examples]
    base = Promotion(line=line, alias=settings.alias, decision="off", reason="promote.enabled is off",
                     challenger_key=adapter.key, challenger_accuracy=inferred.accuracy,
                     min_improvement=settings.min_improvement, require_significance=settings.require_significance,
                     eval_examples=len(examples) if inferred.scores else 0,
                     eval_source=(f"data.eval_uri {cfg.data.eval_uri}" if cfg.data.eval_uri
                                  else f"this run's split of {summary.dataset_uri}"),
                     comparison_note=None if cfg.data.eval_uri else WEAKER_NOTE)
    if not settings.enabled:
        return base
    store = open_store(cfg.output.store)
    record = read_aliases(store, line)
    champion_key = record.target(settings.alias)
    failures = ([inferred.unusable] if inferred.unusable else []) + summary.quality_gate.failures
    base = base.model_copy(update={"champion_key": champion_key, "champion_since": (
        record.aliases[settings.alias].at if champion_key else None)})
    test, champion_accuracy, how, seconds = None, None, None, None
    comparable = champion_key and champion_key != adapter.key and not failures and inferred.scores
    if comparable:
        found, how, seconds = champion_labels(live, store, champion_key, examples, prompts.labels, cfg, backend)
        champion_accuracy = sum(correct(found, expected)) / len(expected)
        test = paired_test(correct(inferred.scored_labels, expected), correct(found, expected), settings.alpha)
        run_logger().info("promote: champion %s scored in %.1f s (%s): accuracy %.4f", champion_key, seconds, how,
                          champion_accuracy)
    del live  # the challenger's model is released once the champion is scored
    decision, reason = decide(settings, failures, inferred.accuracy, champion_accuracy, test,
                              has_champion=champion_key is not None, is_champion=champion_key == adapter.key,
                              gate_on=cfg.hub.min_eval_accuracy is not None or cfg.hub.require_beat_base)
    promotion = base.model_copy(update={
        "decision": decision, "reason": reason, "champion_accuracy": champion_accuracy, "test": test,
        "improvement": None if champion_accuracy is None else inferred.accuracy - champion_accuracy,
        "champion_scored_by": how, "champion_seconds": None if seconds is None else round(seconds, 3)})
    return record_decision(store, record, promotion, summary, scored=bool(inferred.scores) or not prompts.labels,
                           smoke_failed=bool(inferred.unusable))


def record_decision(store: Store, record: LineAliases, promotion: Promotion, summary: Any, scored: bool,
                    smoke_failed: bool) -> Promotion:
    """Move the aliases for `promotion` (candidate for every scored challenger, the alias too when promoted), and
    emit the event for a decision people should hear of (not for a run that fails anyway, nor a repeat)."""
    log = run_logger()
    moves: dict[str, str] = {}
    if promotion.decision != "kept" and not smoke_failed and scored:
        moves[CANDIDATE_ALIAS] = promotion.challenger_key
    if promotion.decision == "promoted":
        moves[promotion.alias] = promotion.challenger_key
    repeat = promotion.decision == "refused" and already_refused(record, promotion.challenger_key, promotion.champion_key)
    if moves and not repeat:
        move_aliases(store, promotion.line, moves, flow_run_id=summary.flow_run_id, by=f"flow run {summary.flow_run_id}",
                     decision=promotion.decision, reason=promotion.reason, scores=promotion.scores(),
                     details=history_details(promotion, summary))
    gate_or_smoke = promotion.decision == "refused" and (smoke_failed or summary.quality_gate.failures)
    event = None
    if promotion.decision in ("promoted", "refused") and not gate_or_smoke and not repeat:
        event = EVENT_MADE if promotion.decision == "promoted" else EVENT_REFUSED
        emit_promotion_event(event, promotion, summary)
    log.info("promote: %s (%s)%s%s", promotion.decision, promotion.reason,
             f"; aliases moved: {', '.join(moves)}" if moves and not repeat else "",
             "; refused before for this champion: not notified again" if repeat else "")
    return promotion.model_copy(update={"aliases_moved": [] if repeat else list(moves), "event": event,
                                        "repeat": repeat})


def history_details(promotion: Promotion, summary: Any) -> dict[str, Any]:
    """The history entry's `details`: the champion compared against, the eval set, the data, the parent, the run."""
    return {
        "champion_key": promotion.champion_key, "eval_source": promotion.eval_source,
        "dataset_uri": summary.dataset_uri, "dataset_sha256": summary.dataset_sha256,
        "dataset_etag": summary.dataset_etag, "parent_adapter": summary.parent_adapter,
        "base_accuracy": summary.base_eval_accuracy, "run_url": summary.run_url,
    }


def event_payload(promotion: Promotion, summary: Any) -> dict[str, Any]:
    """What a notification shows: the decision, both scores, the test, the run and its data."""
    return {
        "line": promotion.line, "alias": promotion.alias, "decision": promotion.decision, "reason": promotion.reason,
        "challenger_key": promotion.challenger_key, "champion_key": promotion.champion_key,
        **{k: (float(f"{v:.4g}") if k == "p_value" else round(v, 4)) if isinstance(v, float) else v
           for k, v in promotion.scores().items()},  # accuracies to 4 places, p to 4 significant figures
        "flow_run_id": summary.flow_run_id, "run_url": summary.run_url, "dataset_uri": summary.dataset_uri,
        "eval_source": promotion.eval_source,
    }


def emit_promotion_event(event: str, promotion: Promotion, summary: Any) -> None:
    """A Prefect event on resource `loraflow.line.<line>`; inside a run Prefect relates it to the flow run."""
    from prefect.events import emit_event

    emit_event(event=event, resource={"prefect.resource.id": f"loraflow.line.{promotion.line}",
                                      "prefect.resource.name": promotion.line},
               payload=event_payload(promotion, summary))
