"""Models written with localmap regions, shared by the demo, tests and benchmarks."""

from localmap.models.llama import GroupedExperts, Llama, LlamaBlock, MoEBlock, project_heads, rms_norm

__all__ = ["GroupedExperts", "Llama", "LlamaBlock", "MoEBlock", "project_heads", "rms_norm"]
