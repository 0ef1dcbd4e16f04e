"""The public entry point: ``LLM(model, **config).generate(prompts, sampling_params)``."""
from __future__ import annotations

from typing import Any

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know


def _check_conversations(conversations: Any) -> list[list[dict[str, Any]]]:
    """``LLM.chat``'s argument as a list of conversations, each checked message by message (see ``LLM.chat``)."""
    if not isinstance(conversations, (list, tuple)):
        raise TypeError(f"conversations must be a list of messages (one conversation) or a list of such lists, "
                        f"got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("conversations is empty: give one conversation (a list of messages) or a list of them")
    if all(isinstance(c, dict) for c in conversations):
        conversations = [conversations]  # one conversation
    out = []
    for i, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)):
            raise TypeError(f"conversation {i}: expected a list of message dicts, got {type(conv).__name__}")
        if not conv:
            raise ValueError(f"conversation {i} is empty")
        for j, msg in enumerate(conv):
            where = f"conversation {i}, message {j}"
            if not isinstance(msg, dict):
                raise TypeError(f"{where}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
            missing = [k for k in ("role", "content") if k not in msg]
            if missing:
                raise ValueError(f"{where}: missing {' and '.join(repr(k) for k in missing)}")
            if msg["role"] not in CHAT_ROLES:
                raise ValueError(f"{where}: unknown role {msg['role']!r} (one of {', '.join(CHAT_ROLES)})")
            if not isinstance(msg["content"], str):
                raise TypeError(f"{where}: content must be a string, got {type(msg['content']).__name__}")
        out.append(list(conv))
    return out


class LLM:
    """An offline inference engine for a Llama, Mistral, Qwen2 or Qwen3 checkpoint.

    Args:
        model: a folder with a Hugging Face checkpoint (config.json, tokenizer files, safetensors).
        **config: engine settings; see :class:`nanovllm.config.Config` for every field and its default.

    Raises:
        TypeError: an unknown keyword (named) or a setting of the wrong type.
        ValueError: a setting out of range, or a checkpoint that is missing, of an unsupported architecture or inconsistent with its config.
    """

    def __init__(self, model: str, **config: Any) -> None:
        self.config = Config.from_kwargs(model, **config)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: list[str] | list[list[int]], sampling_params: SamplingParams | list[SamplingParams]
                 | None = None, use_tqdm: bool = True) -> list[dict[str, Any]]:
        """Generate a completion for every prompt.

        Args:
            prompts: a list of strings or a list of token-id lists.
            sampling_params: one :class:`SamplingParams` for all prompts, or a list with one per prompt;
                None means ``SamplingParams()``. A request stops at ``max_tokens`` completion tokens or when
                prompt + completion reach ``max_model_len`` tokens, whichever comes first (finish_reason
                "length"); a ``max_tokens`` beyond that room is cut, not refused.
            use_tqdm: show a progress bar over finished requests with prefill and decode tokens/s.

        Returns:
            In input order, one dict per prompt: ``"text"`` (the completion, special tokens skipped),
            ``"token_ids"`` (the generated ids), ``"finish_reason"`` ("stop" or "length") and
            ``"num_cached_tokens"`` (prompt tokens served from the prefix cache).

        Raises:
            TypeError: prompts or sampling_params of the wrong type.
            ValueError: a bad request (empty prompt, token id outside the vocabulary, no room under
                max_model_len, larger than the KV pool), or a list of sampling params of the wrong length.
                Nothing runs when any request is bad, and the engine stays usable.
        """
        engine = self.engine
        token_ids = engine.tokenize(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(token_ids)
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            if len(params) != len(token_ids):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(token_ids)} prompts")
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        else:
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, "
                            f"got {type(sampling_params).__name__}")
        for i, p in enumerate(params):
            if i == 0 or p is not params[i - 1]:
                try:
                    p.validate()  # again: a field may have been changed since construction
                except (ValueError, TypeError) as e:
                    raise type(e)(f"sampling_params of prompt {i}: {e}") from None
        for i, (ids, p) in enumerate(zip(token_ids, params)):
            engine.validate(i, ids, p)
        seqs = engine.generate(token_ids, params, use_tqdm=use_tqdm)
        return [{
            # the text leaves out the EOS / stop token that ended the request (token_ids keep it)
            "text": self.tokenizer.decode(s.completion_token_ids[:-1] if s.finish_reason == "stop"
                                          else s.completion_token_ids, skip_special_tokens=True),
            "token_ids": s.completion_token_ids,
            "finish_reason": s.finish_reason,
            "num_cached_tokens": s.num_prefix_hit_tokens or 0,
        } for s in seqs]

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[dict[str, Any]]:
        """Apply the tokenizer's chat template (through transformers) to each conversation and generate.

        Args:
            conversations: one conversation (a list of ``{"role", "content"}`` messages) or a list of them.

        Returns:
            As :meth:`generate`.

        Raises:
            TypeError: ``conversations`` is not a list of messages or a list of such lists (a single dict, None,
                a string), or a message is not a dict / its content not a string (the conversation index and the
                message index are named).
            ValueError: an empty list, an empty conversation, a message without ``role`` or ``content``, or a
                role outside :data:`CHAT_ROLES` (named likewise). Nothing runs before these checks.
        """
        convs = _check_conversations(conversations)
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def kv_cache_usage(self) -> float:
        """Fraction of the KV blocks held by live sequences (0.0 when no request is running)."""
        return self.engine.block_manager.usage()

    def stats(self) -> dict[str, float]:
        """Engine counters: prefix-cache hit tokens, preemptions, prefill/decode tokens and seconds, decode steps
        (model steps) and decode rounds (``step()`` calls; fewer than the steps with ``num_scheduler_steps > 1``),
        and ``host_seconds``: the host work of the steps (scheduling, a step's inputs before its first launch, the
        postprocess after its tokens are read); the device waits for it, except in decode rounds planned ahead
        by async scheduling, where it overlaps the device's work."""
        st = self.engine.stats
        return {
            "prefix_cache_hit_tokens": self.engine.block_manager.num_cache_hit_tokens,
            "num_preemptions": self.engine.scheduler.num_preemptions,
            "num_kvcache_blocks": self.config.num_kvcache_blocks,
            "prefill_tokens": st.prefill_tokens,
            "prefill_seconds": st.prefill_seconds,
            "decode_tokens": st.decode_tokens,
            "decode_seconds": st.decode_seconds,
            "decode_steps": st.decode_steps,
            "decode_rounds": st.decode_rounds,
            "host_seconds": st.host_seconds,
        }

    def shutdown(self) -> None:
        """Stop tensor-parallel workers, if any (also done at exit)."""
        runner = self.engine.model_runner
        if hasattr(runner, "shutdown"):
            runner.shutdown()
