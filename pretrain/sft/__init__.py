"""Instruction tuning (SFT) on LLaVA-format conversations: the chat template, the LLaVA reader's
rules, the demo's synthetic conversations. Conversations become ordinary shards (one document per
conversation, `tools/prepare_data.py llava`) and train through the pretraining loop with
`train.init_from` (pretrain/configs/sft_*.yaml)."""
