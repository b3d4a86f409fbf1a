"""The probe: replacement, interchange and deletion distances of one model on one batch.

Pure torch and numpy; it knows nothing about training frameworks.
"""
