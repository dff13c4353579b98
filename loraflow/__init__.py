"""loraflow: LoRA/QLoRA fine-tuning of Llama-family models as a Prefect 3 flow."""

__version__ = "0.1.0"
