"""Native multimodal pretraining: configs, models, data pipeline, training loop, checkpoints.

See README.md for how to run it and docs/architecture.md for how the parts fit together
(the batch contract, the attention mask, the rules of the house).
"""
