"""Compression: calibration statistics, quantized (+ low-rank) checkpoints."""
