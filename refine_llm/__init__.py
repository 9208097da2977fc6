"""refine_llm."""
