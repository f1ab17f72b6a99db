"""N-gram language models: building KenLM's tools, building LMs, CTC beam search with them, tuning its weights."""
