"""Inputs: records -> texts -> token ids and step spans. File sniffing and
readers, segmenters, chat templates and tokenization. May import checkpoints/
(a GGUF file's chat template) and the core."""
