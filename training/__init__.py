"""LoRA SFT/DPO training, the sandbox base-model builder and inference backends."""
