"""The training-time monitor: schedule, snapshot, executor, ranks, alerts and sinks.

Framework-agnostic; the Lightning and HF Trainer adapters live in `integrations`.
"""
