"""format-prompts: render every row with the template and the model's tokenizer, split off the eval set
(loraflow/prompts.py)."""

from __future__ import annotations

from prefect import task

from loraflow.cache_keys import note_cache_hit, prompts_cache_key
from loraflow.config import DataConfig, InferSettings, ModelConfig, PromptConfig
from loraflow.data import Dataset
from loraflow.prompts import Prompts, format_prompts, load_tokenizer


@task(name="format-prompts", cache_key_fn=prompts_cache_key, persist_result=True, on_completion=[note_cache_hit])
def format_prompts_task(
    dataset: Dataset, eval_dataset: Dataset | None, prompt: PromptConfig, data: DataConfig, infer: InferSettings,
    model: ModelConfig,
) -> Prompts:
    """Training texts (EOS appended), eval prompts with their answers, and the smoke-test prompts; bad data fails here."""
    return format_prompts(dataset, eval_dataset, prompt, data, infer, load_tokenizer(model.name, model.revision), model)
