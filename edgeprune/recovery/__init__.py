"""Recovery fine-tuning (group-wise or LoRA), merged back into the pruned-model format."""
from .finetune import FinetuneConfig, FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
