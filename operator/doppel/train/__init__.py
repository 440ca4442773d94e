"""LoRA fine-tuning (transformers + peft + accelerate) and its evaluation report."""
