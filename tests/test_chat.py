"""Chat prompts (engines.models.chat) on the real SmolLM2-135M-Instruct tokenizer, converted once from
the embedded GGUF: the template applied once into ids, its end-of-turn token, multi-turn and system
messages, the refusal for a model without a template (the embedded Gemma base), and one real greedy
answer with transformers."""
from __future__ import annotations

import pytest

from engines.models.chat import ChatPrompt, build_chat_ids, chat_messages, chat_prompt_for, end_of_turn_ids
from engines.models.sources import resolve_model
from engines.protocol import EngineError

QUESTION = "What is the capital of France?"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("smollm2-135m-instruct")  # converted once per machine (~40 s), then cached


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2.path)


def test_question_is_37_ids_with_the_default_system_prompt(smollm2, tokenizer):
    prompt = chat_prompt_for(smollm2, QUESTION)
    assert isinstance(prompt, ChatPrompt)
    assert prompt.text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                           f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    # 37 ids, as llama.cpp and transformers both give for this prompt (DESIGN.md).
    assert prompt.num_tokens == 37
    # BOS (<|im_start|>, id 1) comes from the template, once per turn, and is never added in front again.
    assert tokenizer.bos_token_id == 1 and prompt.token_ids[0] == 1 and prompt.token_ids[1] != 1
    assert prompt.token_ids.count(1) == 3
    assert list(prompt.token_ids) == tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)["input_ids"]


def test_turn_ends_at_im_end(smollm2, tokenizer):
    prompt = chat_prompt_for(smollm2, QUESTION)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompt.stop_token_ids[0] == im_end == 2
    assert prompt.stop_strings[0] == "<|im_end|>"
    assert end_of_turn_ids(tokenizer) == (im_end,)  # also SmolLM2's EOS: listed once


def test_system_message_replaces_the_default_and_turns_accumulate(tokenizer):
    first = build_chat_ids(tokenizer, QUESTION, system="Answer in one word.")
    assert DEFAULT_SYSTEM not in first.text
    assert first.text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert first.messages[0] == {"role": "system", "content": "Answer in one word."}
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."}]
    second = build_chat_ids(tokenizer, chat_messages("And of Italy?", system="Answer in one word.", history=history))
    # The second turn's prompt extends the first: its ids, the answer, the end of turn, the new question.
    assert second.token_ids[:first.num_tokens] == first.token_ids
    assert second.text.endswith("Paris.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert [message["role"] for message in second.messages] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize("messages, system, message", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None, "must end with a user"),
    ([], None, "must end with a user"),
    ([{"role": "system", "content": "a"}, {"role": "user", "content": "hi"}], "b", "either as `system`"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "a"}, {"role": "user", "content": "x"}],
     None, "system message can only come first"),
    ([{"role": "tool", "content": "hi"}], None, "role 'tool'"),
    ([{"role": "user", "text": "hi"}], None, "must be a {'role', 'content'} mapping"),
])
def test_malformed_messages_are_refused(tokenizer, messages, system, message):
    with pytest.raises(EngineError, match=message):
        build_chat_ids(tokenizer, messages, system=system)


def test_model_without_a_chat_template_gets_the_message():
    gemma = resolve_model("gemma-3-270m")  # the embedded GGUF carries no tokenizer.chat_template
    with pytest.raises(EngineError, match="model 'gemma-3-270m' has no chat template, so chat mode cannot"):
        chat_prompt_for(gemma, QUESTION)


def test_greedy_chat_answer_names_paris(smollm2):
    """One real generation from the chat ids, fp32 on the CPU. The first token is a near-tie in this
    model ("The" 25.36 against "L" 25.26 here; llama.cpp's Q4_1 kernels pick "L"), so this is
    transformers' answer from the converted checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    prompt = chat_prompt_for(smollm2, QUESTION)
    input_ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12,
                                do_sample=False, eos_token_id=list(prompt.stop_token_ids),
                                pad_token_id=tokenizer.pad_token_id)
    new_ids = output[0, input_ids.shape[1]:].tolist()
    answer = tokenizer.decode(new_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new_ids[-1] in prompt.stop_token_ids, f"the turn did not end within 12 tokens: {answer!r}"


def test_every_local_engine_is_given_the_same_prompt_ids():
    # One ChatPrompt, built once from the template; each engine's own encode() turns it into what it feeds
    # its model. Created, not loaded: encoding a chat prompt needs no weights.
    from engines.models.chat import chat_prompt_for
    from engines.models.sources import resolve_model
    from engines.registry import create_engine
    prompt = chat_prompt_for(resolve_model("smollm2-135m-instruct"), "What is the capital of France?")
    ids = list(prompt.token_ids)
    assert len(ids) == 37
    for name in ("bf16", "nf4", "gptq-int4", "spec"):
        input_ids, mask = create_engine(name, model="smollm2-135m-instruct", device="cpu").encode(prompt)
        assert input_ids[0].tolist() == ids and int(mask.sum()) == len(ids), name
    assert create_engine("vllm", model="smollm2-135m-instruct").encode(prompt, 16) == ids
    assert create_engine("gguf", model="smollm2-135m-instruct").encode(prompt) == ids
