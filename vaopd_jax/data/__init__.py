"""Data: Qwen3-VL processor + pixelated view (processor), tokenizer, parquet sources, the offline
vision-critical task (synthetic), fixture writers (fixtures), the grain pipeline (pipeline) and the typed
PromptBatch it yields (batch), and each training split's source and iterator (splits)."""
