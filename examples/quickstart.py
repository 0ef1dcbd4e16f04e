"""Generate with the embedded tiny model (or a checkpoint given as the first argument)."""
import sys

from nanovllm import LLM, SamplingParams
from nanovllm.utils.tiny_model import build_tiny_checkpoint, default_checkpoint_dir

model = sys.argv[1] if len(sys.argv) > 1 else build_tiny_checkpoint(default_checkpoint_dir())
llm = LLM(model, max_model_len=1024)
prompts = ["Hello, my name is", "The capital of France is"]
for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(temperature=0.6, top_p=0.9, max_tokens=32))):
    print(f"{prompt!r} -> {out['text']!r} ({out['finish_reason']})")
print(llm.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=16))[0]["text"])
