"""Native multimodal pretraining: configs, models, data pipeline, training loop, checkpoints.

See ../README.md for how to run; DESIGN.md (shared) for the contracts between the parts.
"""
