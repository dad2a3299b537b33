"""Data tools: row files read and written one way everywhere, prompt templates and their rendering as slime's
``Dataset`` renders prompts."""
