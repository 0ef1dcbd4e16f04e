"""nano-vllm-coconut: a small, readable offline LLM inference engine."""
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.2.0"
