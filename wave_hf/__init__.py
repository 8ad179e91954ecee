"""wave-hf: a ViT model factory on the Hugging Face stack (WAVE templates, FS-Merge)."""
