"""LLM-judged metrics (alignment, coherence): backends, the Betley scoring rule, and a shared judgement cache."""
