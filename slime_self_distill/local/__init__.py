"""The single-process trainer: self-distillation in one process on a Hugging Face causal LM, and its CPU demo."""
