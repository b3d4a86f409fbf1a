"""Removal guidance: which layers to remove, and the measured cost of removing them."""
