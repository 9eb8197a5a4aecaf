"""Facts that follow from a model family: its chat template and which MindSpeed-LLM converter knows it."""

DEFAULT_TEMPLATE = {"qwen3": "qwen3", "qwen3_moe": "qwen3", "qwen2": "qwen", "llama": "llama3"}

# convert_ckpt_v2.py has model types for qwen3/qwen3-moe only; Qwen2.5 and Llama-3 need legacy convert_ckpt.py
CONVERTER = {"qwen3": "v2", "qwen3_moe": "v2", "qwen2": "legacy", "llama": "legacy"}

# MindSpeed-LLM's --model-type-hf per family (the legacy converter reads Qwen2.5 and Llama-3 as llama2)
HF_MODEL_TYPE = {"qwen3": "qwen3", "qwen3_moe": "qwen3-moe", "qwen2": "llama2", "llama": "llama2"}
