"""Model names: the served model, and presets that pick a strategy by `"model"` (docs/api.md).

A client that can send only `model` (most OpenAI-compatible clients and UIs) chooses a strategy by
naming a preset. Built in, for the bundled model, one preset per strategy that the long-document
passkey grid measured best on it (docs/eval/long/results.md, 5 keys a cell): `<served>-dca` 5/5 at
16k and at 32k, `<served>-rerope` and `<served>-self_extend` 5/5 at 16k; and `<served>-auto`, which
picks by length. `ROPESERVE_PRESETS` adds presets (or replaces built-in ones of the same id): a JSON
object `{"<id>": <strategy>}`, or the path of a file holding one, where <strategy> is what a
request's `strategy` field takes, e.g. `{"smollm2-32k": {"name": "dca"}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from server.engines.base import SamplingOptions
from server.http.errors import ApiError, validation_error
from server.plan import StrategyError
from server.schemas import ModelCard, OpenAIErrorInfo, OpenAIErrorResponse, StrategySpec, clipped
from server.service.generation_service import GenerationService, JobDraft
from server.settings import Settings

# Suffix of a built-in preset's id (after "<served>-") and its strategy.
BUILTIN_PRESETS: dict[str, StrategySpec] = {
    "dca": {"name": "dca"},
    "rerope": {"name": "rerope"},
    "self_extend": {"name": "self_extend"},
    "auto": {"name": "auto"},
}
MAX_PRESET_ID_CHARS = 256


class PresetError(ValueError):
    """ROPESERVE_PRESETS cannot be used (the server does not start)."""


class UnknownModel(Exception):
    """A `model` that is neither the served model nor a preset: 404 in OpenAI's and vLLM's shape."""

    def __init__(self, asked: str, served: str) -> None:
        super().__init__(asked)
        self.message = (
            f"The model `{clipped(asked)}` does not exist. Valid models: `{served}` and its presets (GET /v1/models)."
        )

    def response(self) -> JSONResponse:
        info = OpenAIErrorInfo(message=self.message, type="NotFoundError", param="model", code=404)
        return JSONResponse(status_code=404, content=OpenAIErrorResponse(error=info).model_dump())


async def unknown_model_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownModel)
    return exc.response()


def parse_presets(value: str | None) -> dict[str, StrategySpec]:
    """ROPESERVE_PRESETS: a JSON object of preset id -> strategy, or the path of a JSON file holding one."""
    if value is None or not value.strip():
        return {}
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise PresetError(f"ROPESERVE_PRESETS: neither a JSON object nor a readable file ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PresetError(f"ROPESERVE_PRESETS: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PresetError('ROPESERVE_PRESETS: must be a JSON object {"<preset id>": <strategy>, ...}')
    for name, spec in data.items():
        if not name.strip() or len(name) > MAX_PRESET_ID_CHARS:
            raise PresetError(f"ROPESERVE_PRESETS: preset ids must be 1..{MAX_PRESET_ID_CHARS} characters")
        if not (isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("name"), str))):
            raise PresetError(
                f"ROPESERVE_PRESETS: preset `{name}`: a strategy is a name or an object with a `name` (got {spec!r})"
            )
    return data


def _as_object(spec: StrategySpec) -> dict[str, Any]:
    return {"name": spec} if isinstance(spec, str) else dict(spec)


@dataclass(frozen=True)
class Preset:
    id: str
    strategy: StrategySpec
    # The longest prompt + max_tokens its strategy allows on this server.
    max_model_len: int


@dataclass
class ServedModels:
    """The names a request's `model` may take, and the strategy each one picks."""

    served: str
    # The longest request under the server's default strategy.
    max_model_len: int
    presets: dict[str, Preset] = field(default_factory=dict)

    def resolve(self, asked: str | None, strategy: StrategySpec | None) -> tuple[str, StrategySpec | None]:
        """The model name a reply echoes and the request's strategy (a preset's, when `asked` names
        one). `asked` left out or empty: the served model, as vLLM does. A preset together with a
        `strategy` field is checked by `check_same_strategy`."""
        if not asked or asked == self.served:
            return self.served, strategy
        preset = self.presets.get(asked)
        if preset is None:
            raise UnknownModel(asked, self.served)
        return asked, preset.strategy

    async def check_same_strategy(
        self, service: GenerationService, asked: str | None, strategy: StrategySpec | None, draft: JobDraft
    ) -> None:
        """A preset named with a `strategy` field too is served when that strategy is the preset's:
        the same spec, or one that plans to the same values for this request (the reply's own
        `strategy`, or the preset's with its defaults spelled out); otherwise 422 naming both."""
        preset = self.presets.get(asked or "")
        if preset is None or strategy is None or _as_object(strategy) == _as_object(preset.strategy):
            return
        theirs = (await service.plan_job(replace(draft, strategy=preset.strategy))).plan.resolved
        try:
            mine = (await service.plan_job(replace(draft, strategy=strategy))).plan.resolved
        except StrategyError:
            mine = None
        if mine != theirs:
            raise validation_error(
                f"strategy: the model `{asked}` is a preset for the strategy {json.dumps(preset.strategy)} "
                f"(here {clipped(json.dumps(theirs))}), and the request's `strategy` is "
                f"{clipped(json.dumps(strategy))}; send one of them (or the served model `{self.served}` with "
                "any strategy)"
            )

    def max_model_len_of(self, asked: str | None) -> int:
        """`max_model_len` of a served name (404 for an unknown one)."""
        name, _ = self.resolve(asked, None)
        return self.presets[name].max_model_len if name in self.presets else self.max_model_len

    def cards(self) -> list[ModelCard]:
        served = ModelCard(id=self.served, created=0, max_model_len=self.max_model_len)
        return [served] + [
            ModelCard(
                id=p.id,
                created=0,
                max_model_len=p.max_model_len,
                root=self.served,
                parent=self.served,
                strategy=p.strategy,
            )
            for p in self.presets.values()
        ]


async def strategy_limit(service: GenerationService, spec: StrategySpec | None) -> int:
    """The longest prompt + max_tokens `spec` allows here, from a plan of a one-token request; a
    strategy that picks another (`auto`) or plans nothing without a document (`nbce`): the engine's."""
    engine_limit = service.model.max_context_tokens or service.model.native_window
    draft = JobDraft("x", (), SamplingOptions(max_new_tokens=1), spec)
    try:
        job = await service.plan_job(draft)
    except StrategyError:
        return engine_limit
    return engine_limit if "chosen" in job.plan.resolved else job.plan.max_total_tokens


async def served_models(settings: Settings, service: GenerationService) -> ServedModels:
    """The served model and its presets: built-in ones (for the bundled model), then ROPESERVE_PRESETS."""
    served = settings.served_model_name or service.model.model_id
    specs: dict[str, StrategySpec] = {}
    if settings.model is None and settings.builtin_presets:
        specs |= {f"{served}-{suffix}": spec for suffix, spec in BUILTIN_PRESETS.items()}
    specs |= parse_presets(settings.presets)
    presets = {}
    for name, spec in specs.items():
        if name == served:
            raise PresetError(f"ROPESERVE_PRESETS: preset `{name}` is the served model's own name")
        try:
            service.resolve_strategy(spec)
        except StrategyError as exc:
            raise PresetError(f"ROPESERVE_PRESETS: preset `{name}`: {exc.message}") from None
        presets[name] = Preset(name, spec, await strategy_limit(service, spec))
    return ServedModels(served, await strategy_limit(service, None), presets)


def get_served_models(request: Request) -> ServedModels:
    models: ServedModels | None = getattr(request.app.state, "models", None)
    if models is None:
        raise ApiError(503, "the engine is still starting", "generation")
    return models
