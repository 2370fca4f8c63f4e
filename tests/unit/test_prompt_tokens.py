"""A request is tokenized before it is planned (server/service/prompt_tokens.py): the ids planning
reads are the model tokenizer's own, long texts are tokenized off the event loop, and the plan is
made inline from those ids, no tokenizer in reach."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from server.engines.base import SamplingOptions
from server.ops.metrics import Metrics
from server.ops.model_store import default_checkpoint_dir
from server.service.generation_service import TOKENIZE_IN_THREAD_CHARS, GenerationService, JobDraft
from server.service.prompt_tokens import PromptTokenizer
from strategies.registry import default_registry
from tests.support.fake_engine import FAKE_MODEL, ByteTokenizer, FakeEngine


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


def test_the_ids_are_the_model_tokenizers(tokenizer):
    documents = ("Alice lives in Oslo.\n\nShe is a pilot.", "Bob: a baker, in Riga. Ünïcödé 中文。")
    tokens = PromptTokenizer(tokenizer).tokens("Who flies?", documents)
    assert list(tokens.prompt) == tokenizer.encode("\n\n".join((*documents, "Who flies?")))
    assert list(tokens.inputs) == tokenizer.encode("Who flies?", add_special_tokens=False)
    assert list(tokens.question) == tokenizer.encode("\n\nWho flies?", add_special_tokens=False)
    for text, document in zip(documents, tokens.documents, strict=True):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert list(document.ids) == encoded["input_ids"] and document.text == text
        assert list(document.ends) == [end for _, end in encoded["offset_mapping"]]
    alone = PromptTokenizer(tokenizer).tokens("Who flies?")
    assert list(alone.prompt) == tokenizer.encode("Who flies?") and alone.documents == () and alone.question == ()
    given = PromptTokenizer(tokenizer).tokens("decoded text", prompt_ids=[5, 6, 7])
    assert given.prompt == given.inputs == (5, 6, 7)


def test_a_tokenizer_without_offsets_spreads_them_over_the_text():
    document = PromptTokenizer(ByteTokenizer()).document("one two")
    assert document.ids == tuple(b"one two") and document.ends == (1, 2, 3, 4, 5, 6, 7)


class ThreadRecordingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("long", [False, True])
async def test_long_texts_are_tokenized_off_the_loop_and_planned_on_it(long):
    tokenizer, engine = ThreadRecordingTokenizer(), FakeEngine()
    engine.model = dataclasses.replace(FAKE_MODEL, native_window=2 * TOKENIZE_IN_THREAD_CHARS)
    service = GenerationService(engine, default_registry(), tokenizer, Metrics(), "native", 4)
    text = "x" * (TOKENIZE_IN_THREAD_CHARS if long else 10)
    job = await service.plan_job(JobDraft(text, (), SamplingOptions(max_new_tokens=2), None))
    assert job.plan.rows == [list(text.encode())]
    on_loop = {t is threading.main_thread() for t in tokenizer.threads}
    assert on_loop == {not long}
