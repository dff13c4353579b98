"""The eight steps of a fine-tuning run, one per file: a plain function that does the work, and a thin @task."""
