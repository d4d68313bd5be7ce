"""The model: loading it, LoRA, dropout, saving it as a Hugging Face folder, the embedded default."""
