"""Distributed instruction-tuning with LoRA on a quantised base."""
