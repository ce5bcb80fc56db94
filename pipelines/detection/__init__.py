"""Spatio-temporal action detection (AVA): the official frame-mAP evaluator and its prediction files."""
