"""The steps of a fine-tuning run, one per file: a verb-named @task (name, retries, cache policy) over one core call."""
