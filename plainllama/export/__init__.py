"""Writing models out: `plainllama convert` (a Hugging Face folder or a Meta folder) from any input."""
