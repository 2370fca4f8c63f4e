"""A fake engine for tests of pure HTTP plumbing (auth, overload, schema): never a feature's only test."""

from __future__ import annotations

import asyncio

from server.engines.base import EngineStats, EngineStep, Parallelism, RowRequest, StepStream, TokenEvent, TopToken
from server.ops.metrics import Metrics
from server.plan import ModelFacts, RopeConfig
from server.service.admission import AdmissionController
from server.service.generation_service import GenerationService
from server.service.queue_admission import admission_controller
from server.settings import Settings
from strategies.registry import default_registry

FAKE_MODEL = ModelFacts(
    model_id="fake",
    native_window=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    head_dim=8,
    vocab_size=256,
)


class ByteTokenizer:
    eos_token_id = None
    all_special_ids: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        turns = "".join(f"<{m['role']}>{m['content']}\n" for m in conversation)
        return turns + ("<assistant>" if add_generation_prompt else "")


class FakeEngine:
    """Echoes the prompt's bytes back, one token per `delay` seconds."""

    kind = "fake"
    dtype = "float32"
    startup_seconds = 0.0
    max_rows_per_step = 8
    kv_capacity_tokens = 4096
    alive = True
    parallelism = Parallelism()

    def __init__(self, delay: float = 0.0) -> None:
        self.model = FAKE_MODEL
        self.delay = delay
        self.aborted: list[str] = []
        self.cancelled = 0

    @property
    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer()

    def refuse_rope(self, rope: RopeConfig) -> str | None:
        return None

    def can_admit(self, rope: RopeConfig) -> bool:
        return True

    async def generate_group(self, rows: list[RowRequest]) -> list[StepStream]:
        return [self.generate(row) for row in rows]

    async def generate(self, row: RowRequest) -> StepStream:
        n = row.sampling.max_new_tokens
        for i in range(n):
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:  # as in vLLM, where a cancelled stream aborts its row
                self.cancelled += 1
                raise
            token = row.prompt_token_ids[i % len(row.prompt_token_ids)]
            done = i == n - 1
            # Like vLLM's: the token itself and the `top_logprobs` likeliest (here: the next ids).
            top = tuple(
                TopToken((token + k) % 256, chr((token + k) % 256), -0.5 - k)
                for k in range(row.sampling.top_logprobs + 1)
            )
            yield EngineStep(
                tokens=[TokenEvent(token, chr(token), -0.5, False, top if row.sampling.top_logprobs else ())],
                text=chr(token),
                finished=done,
                finish_reason="length" if done else None,
                prompt_tokens=len(row.prompt_token_ids),
            )

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    def stats(self) -> EngineStats:
        return EngineStats()

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def fake_service_factory(
    delay: float = 0.0, engine: FakeEngine | None = None, admission: AdmissionController | None = None
):
    async def build(settings: Settings) -> GenerationService:
        return GenerationService(
            engine=engine or FakeEngine(delay),
            registry=default_registry(),
            tokenizer=ByteTokenizer(),
            metrics=Metrics(),
            default_strategy=settings.default_strategy,
            max_concurrent_requests=settings.max_concurrent_requests,
            request_timeout_s=settings.request_timeout_s,
            admission=admission or admission_controller(settings),
        )

    return build
