"""Offline tools: the command line, checkpoint loading, score, replay and report."""
