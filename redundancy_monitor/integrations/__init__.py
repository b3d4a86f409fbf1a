"""Thin adapters from training frameworks (Lightning, the HF Trainer) to the monitor."""
