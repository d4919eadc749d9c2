"""The coroutines that drive vLLM's AsyncLLM for engines/variants/vllm/engine.py. They run on the engine's
private event loop; results cross back to the caller's thread through a queue or a future.

- `produce_deltas`: one streamed request, each output emitted as a Chunk (text, new ids, finish reason)
  to the shared stream loop; a failure ends the coroutine's future. Cancelling its task aborts the
  request in vLLM.
- `gather_timed`: many requests submitted at once (continuous batching), each timed from the submit.
- `arrivals_timed`: requests submitted at scheduled offsets (open-loop arrivals, as `vllm bench serve
  --request-rate` sends them), optionally at most N in flight; each timed from its own arrival, with
  the time and token count of every output, so TPOT and ITL can be computed (engines/measure/load.py).
- `prompt_perplexity`: perplexity from prompt_logprobs.
- `cancel_pending_tasks`: lets the loop stop cleanly once the engine is shut down.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

from engines.protocol import EngineError
from engines.variants.streaming import Chunk

_request_numbers = itertools.count()


@dataclass
class RequestTiming:
    """One request of a concurrent batch; times count from the request's arrival (for gather_timed, the
    batch's submit). `arrival_s` is that arrival from the start of the whole run; `chunk_times_s` holds
    (seconds from arrival, tokens) for every output vLLM streamed back (one token each unless a
    speculative step accepted several)."""
    num_tokens: int
    ttft_s: float | None
    total_s: float
    arrival_s: float = 0.0
    chunk_times_s: list[tuple[float, int]] = field(default_factory=list)


def request_id(engine_name: str) -> str:
    return f"{engine_name}-{next(_request_numbers)}"


async def produce_deltas(llm, engine_name: str, prompt_ids: list[int], sampling, recorder, emit) -> None:
    async for output in llm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id(engine_name)):
        completion = output.outputs[0]
        recorder.on_tokens(len(completion.token_ids))
        reason = completion.finish_reason
        emit(Chunk(token_ids=list(completion.token_ids), text=completion.text,
                   finish_reason={"stop": "eos"}.get(reason, reason)))


async def gather_timed(llm, engine_name: str, all_prompt_ids: list[list[int]], sampling) -> list[RequestTiming]:
    submitted = time.perf_counter()

    async def one(prompt_ids) -> RequestTiming:
        first_s, num_tokens = None, 0
        async for output in llm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id(engine_name)):
            num_tokens += len(output.outputs[0].token_ids)
            if first_s is None and num_tokens:
                first_s = time.perf_counter() - submitted
        return RequestTiming(num_tokens, first_s, time.perf_counter() - submitted)
    return list(await asyncio.gather(*(one(prompt_ids) for prompt_ids in all_prompt_ids)))


async def arrivals_timed(llm, engine_name: str, all_prompt_ids: list[list[int]], sampling,
                         arrival_offsets_s: list[float], max_concurrency: int | None = None) -> list[RequestTiming]:
    """Submit request i at `arrival_offsets_s[i]` seconds after the start (sleeping on this loop until
    then); with max_concurrency, a request that arrives while that many are in flight is sent when one
    finishes, and its arrival is the moment it is sent (a closed loop of that many clients)."""
    started = time.perf_counter()
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(prompt_ids, offset_s: float) -> RequestTiming:
        delay = started + offset_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is not None:
            await limit.acquire()
        try:
            arrived = time.perf_counter()
            chunks, num_tokens = [], 0
            async for output in llm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id(engine_name)):
                count = len(output.outputs[0].token_ids)
                if count:
                    chunks.append((time.perf_counter() - arrived, count))
                    num_tokens += count
            total_s = time.perf_counter() - arrived
        finally:
            if limit is not None:
                limit.release()
        return RequestTiming(num_tokens, chunks[0][0] if chunks else None, total_s, arrived - started, chunks)
    return list(await asyncio.gather(*(one(ids, offset) for ids, offset in zip(all_prompt_ids, arrival_offsets_s))))


async def prompt_perplexity(llm, engine_name: str, prompt_ids: list[int], sampling) -> float:
    """exp(mean negative log-likelihood) of every token after the first (BOS), which has no logprob."""
    prompt_logprobs = None
    async for output in llm.generate({"prompt_token_ids": prompt_ids}, sampling, request_id(engine_name) + "-ppl"):
        prompt_logprobs = output.prompt_logprobs or prompt_logprobs
    if not prompt_logprobs:
        raise EngineError(f"{engine_name}: vLLM returned no prompt logprobs, so there is no perplexity")
    scored = [position[token].logprob for token, position in zip(prompt_ids[1:], prompt_logprobs[1:])]
    return math.exp(-sum(scored) / len(scored))


async def cancel_pending_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
