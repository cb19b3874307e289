"""Generation backends behind one interface (`base.GenerationEngine`): `hf` (built in) and `vllm` (optional)."""

ENGINES = ("hf", "vllm")
