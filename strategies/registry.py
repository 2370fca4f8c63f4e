"""Strategies by name: the built-ins plus whatever packages declare in the
`ropeserve.strategies` entry-point group (name = "module:StrategyClass")."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from strategies.base import MAX_REPORTED_ERRORS, Strategy, StrategyError, StrategySpec, clipped

ENTRY_POINT_GROUP = "ropeserve.strategies"
# Characters of one error line at most: a parameter's name or message may quote client input.
MAX_ERROR_CHARS = 300

# Built-ins are imported directly so they exist even when the package is not installed.
BUILTIN_STRATEGIES = (
    "strategies.native:NativeStrategy",
    "strategies.linear:LinearStrategy",
    "strategies.ntk:NtkStrategy",
    "strategies.dynamic_ntk:DynamicNtkStrategy",
    "strategies.yarn:YarnStrategy",
    "strategies.llama3:Llama3Strategy",
    "strategies.rerope:ReropeStrategy",
    "strategies.leaky_rerope:LeakyReropeStrategy",
    "strategies.self_extend:SelfExtendStrategy",
    "strategies.dca:DcaStrategy",
    "strategies.string:StringStrategy",
    "strategies.nbce:NbceStrategy",
    "strategies.auto:AutoStrategy",
)

log = logging.getLogger(__name__)


def _load(target: str) -> type[Strategy[Any]]:
    module_name, _, attr = target.partition(":")
    cls: type[Strategy[Any]] = getattr(importlib.import_module(module_name), attr)
    return cls


class StrategyRegistry:
    def __init__(self) -> None:
        self._classes: dict[str, type[Strategy[Any]]] = {}

    def register(self, cls: type[Strategy[Any]]) -> type[Strategy[Any]]:
        existing = self._classes.get(cls.name)
        if existing is not None and existing is not cls:
            raise ValueError(f"strategy name '{cls.name}' is already taken by {existing.__qualname__}")
        self._classes[cls.name] = cls
        return cls

    def load_builtins(self) -> None:
        for target in BUILTIN_STRATEGIES:
            self.register(_load(target))

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
            except Exception:  # a broken plugin must not take the server down
                log.exception("could not load strategy plugin %s", ep.value)
                continue
            if not (isinstance(cls, type) and issubclass(cls, Strategy)):
                log.error("entry point %s does not name a Strategy subclass", ep.value)
                continue
            if cls.name != ep.name:
                log.warning("entry point %s registers strategy '%s'", ep.name, cls.name)
            try:
                self.register(cls)
            except ValueError as exc:
                log.error("%s", exc)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def classes(self) -> list[type[Strategy[Any]]]:
        return [self._classes[name] for name in self.names()]

    def get(self, name: str) -> type[Strategy[Any]]:
        try:
            return self._classes[name]
        except KeyError:
            raise StrategyError(
                f"strategy: unknown strategy '{clipped(name)}'; known: {', '.join(self.names())}"
            ) from None

    def engine_logits_processors(self) -> tuple[str, ...]:
        """Every registered strategy's in-engine processors ("module:Class"), each once."""
        return tuple(dict.fromkeys(p for cls in self.classes() for p in cls.engine_logits_processors))

    def resolve(self, spec: StrategySpec | None, default: str = "native") -> Strategy[Any]:
        """Build a strategy from a request's `strategy` field (a name or {"name": ..., **params})."""
        if spec is None:
            spec = default
        if isinstance(spec, str):
            name, raw_params = spec, {}
        else:
            raw_params = dict(spec)
            name = raw_params.pop("name", None)
            if not isinstance(name, str):
                raise StrategyError("strategy.name: required, the name of a registered strategy")
        cls = self.get(name)
        try:
            params = cls.Params.model_validate(raw_params)
        except ValidationError as exc:
            raise StrategyError(_describe(exc, prefix="strategy")) from None
        return cls(params)


def _describe(exc: ValidationError, prefix: str) -> str:
    """ "strategy.<param>: what is wrong", the first MAX_REPORTED_ERRORS and a count of the rest."""
    parts = []
    for err in exc.errors()[:MAX_REPORTED_ERRORS]:
        loc = ".".join(str(p) for p in (prefix, *err["loc"]))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(clipped(f"{loc}: {msg}", MAX_ERROR_CHARS))
    more = exc.error_count() - MAX_REPORTED_ERRORS
    return "; ".join(parts) + (f"; and {more} more errors" if more > 0 else "")


def default_registry() -> StrategyRegistry:
    registry = StrategyRegistry()
    registry.load_builtins()
    registry.load_entry_points()
    return registry
