"""Data: Qwen3-VL processor + pixelated view (processor), tokenizer, parquet sources, the offline
vision-critical task (synthetic), fixture writers (fixtures) and the grain pipeline (pipeline)."""
