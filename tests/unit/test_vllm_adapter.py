"""The vLLM internals server/engines/vllm_adapter/ relies on, checked against the installed vLLM:
one test per symbol, named by it, so a vLLM upgrade that moves, renames or reshapes one fails the
test that names it (rather than an engine, later, somewhere). Also: no file outside the adapter
names any of its private names, every class path vLLM loads by name resolves, and the runner's
hook points run where vLLM's methods do (on a stand-in runner)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from server.engines.vllm_adapter import PRIVATE_NAMES
from server.engines.vllm_adapter.runner import V1RunnerHooks, mix_into_v1_runner

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "server/engines/vllm_adapter"


def obj(path: str) -> Any:
    """`module.attr.attr` -> the object (the longest importable module prefix, then attributes)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ImportError(path)


def params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def source(target: Any) -> str:
    return textwrap.dedent(inspect.getsource(target))


# `self.<name> = ...` or `self.<name>: type = ...`
SELF_ASSIGNED = r"self\.(\w+)\s*(?::[^=\n]+)?=[^=]"


def assigns(target: Any, attribute: str) -> bool:
    """Whether `target`'s source assigns `self.<attribute>` (plain or annotated)."""
    return attribute in re.findall(SELF_ASSIGNED, source(target))


def function_def(cls: type, name: str) -> ast.FunctionDef:
    node = ast.parse(source(getattr(cls, name))).body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


# --- rotary.py -----------------------------------------------------------------------------------

ROTARY = "vllm.model_executor.layers.rotary_embedding"


def check_rope_dict() -> None:
    # build_rope deletes its rotary from get_rope's memo: the memo must be this dict.
    assert isinstance(obj(f"{ROTARY}._ROPE_DICT"), dict)
    assert "_ROPE_DICT[key] = " in source(obj(f"{ROTARY}.get_rope"))


def check_get_rope() -> None:
    assert params(obj(f"{ROTARY}.get_rope"))[:5] == [
        "head_size",
        "max_position",
        "is_neox_style",
        "rope_parameters",
        "dtype",
    ]


def check_rotary_init() -> None:
    assert params(obj(f"{ROTARY}.RotaryEmbedding.__init__")) == [
        "self",
        "head_size",
        "rotary_dim",
        "max_position_embeddings",
        "base",
        "is_neox_style",
        "dtype",
        "init_cache",
    ]


def check_match_cos_sin_cache_dtype() -> None:
    rotary = obj(f"{ROTARY}.RotaryEmbedding")
    assert params(rotary._match_cos_sin_cache_dtype) == ["self", "query"]
    # The forwards read the table through it, so the in-place table's override takes effect.
    for forward in ("forward_native", "forward_cpu", "forward_cuda"):
        assert "self._match_cos_sin_cache_dtype(query)" in source(getattr(rotary, forward)), forward


def check_table_forwards() -> None:
    from server.engines.vllm_adapter.rotary import TABLE_FORWARDS

    rotary = obj(f"{ROTARY}.RotaryEmbedding")
    for forward in TABLE_FORWARDS:
        assert params(getattr(rotary, forward))[:4] == ["self", "positions", "query", "key"], forward


# --- runner.py -----------------------------------------------------------------------------------

RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"


def check_preprocess() -> None:
    from server.engines.vllm_adapter.runner import PREPROCESS_POSITIONS

    runner = obj(RUNNER)
    assert params(runner._preprocess) == ["self", "scheduler_output", "num_input_tokens", "intermediate_tensors"]
    returns = function_def(runner, "_preprocess").returns
    assert isinstance(returns, ast.Subscript) and isinstance(returns.slice, ast.Tuple)
    assert ast.unparse(returns.slice.elts[PREPROCESS_POSITIONS]) == "torch.Tensor"
    # ... and the runner hands that element to the model as its positions.
    unpacked = [
        node.targets[0]
        for node in ast.walk(ast.parse(source(runner.execute_model)))
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value.func) == "self._preprocess"
    ]
    assert len(unpacked) == 1 and isinstance(unpacked[0], ast.Tuple)
    assert ast.unparse(unpacked[0].elts[PREPROCESS_POSITIONS]) == "positions"


def check_update_states() -> None:
    runner = obj(RUNNER)
    assert params(runner._update_states) == ["self", "scheduler_output"]
    assert "self._update_states(scheduler_output)" in source(runner.execute_model)


def check_load_model() -> None:
    assert callable(obj(RUNNER).load_model)


def runner_attribute(name: str) -> Callable[[], None]:
    def check() -> None:
        assert assigns(obj(RUNNER).__init__, name)

    return check


def check_discard_request_mask_np() -> None:
    # `discarded_rows` reads the buffer's numpy view.
    assert "self.discard_request_mask = self._make_buffer(" in source(obj(RUNNER).__init__)
    assert assigns(obj("vllm.v1.utils.CpuGpuBuffer").__init__, "np")


def check_cpu_runner_is_v1() -> None:
    from server.engines.vllm_adapter.runner import is_v1_runner

    assert is_v1_runner(obj("vllm.v1.worker.cpu_model_runner.CPUModelRunner"))


def scheduler_output_field(name: str) -> Callable[[], None]:
    def check() -> None:
        fields = {f.name for f in dataclasses.fields(obj("vllm.v1.core.sched.output.SchedulerOutput"))}
        assert name in fields

    return check


def check_input_batch_req_ids() -> None:
    assert isinstance(obj("vllm.v1.worker.gpu_input_batch.InputBatch").req_ids, property)


def check_input_batch_logitsprocs() -> None:
    assert assigns(obj("vllm.v1.worker.gpu_input_batch.InputBatch").__init__, "logitsprocs")
    assert isinstance(obj("vllm.v1.sample.logits_processor.state.LogitsProcessors").all, property)


def check_request_sampling_params() -> None:
    fields = {f.name for f in dataclasses.fields(obj("vllm.v1.worker.gpu_input_batch.CachedRequestState"))}
    assert "sampling_params" in fields


def check_request_prompt_length() -> None:
    # Set from the prompt as the state is built (not a dataclass field).
    source = inspect.getsource(obj("vllm.v1.worker.gpu_input_batch.CachedRequestState").__post_init__)
    assert "self.num_prompt_tokens =" in source


def vllm_env(name: str) -> Callable[[], None]:
    def check() -> None:
        assert name in obj("vllm.envs.environment_variables")

    return check


# --- cpu_worker.py, gpu_worker.py ----------------------------------------------------------------


def check_cpu_worker() -> None:
    worker = obj("vllm.v1.worker.cpu_worker.CPUWorker")
    assert params(worker.init_device) == ["self"]
    assert assigns(worker.init_device, "model_runner")


def check_gpu_worker() -> None:
    worker = obj("vllm.v1.worker.gpu_worker.Worker")
    assert params(worker.init_device) == ["self"]
    assert "self._init_workspace_and_model_runner()" in source(worker.init_device)
    assert assigns(worker._init_workspace_and_model_runner, "model_runner")


def check_worker_base() -> None:
    base = obj("vllm.v1.worker.worker_base.WorkerBase").__init__
    assert assigns(base, "parallel_config") and assigns(base, "local_rank")


# --- cpu_attention.py ----------------------------------------------------------------------------

CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"


def check_custom_ops() -> None:
    assert inspect.ismodule(obj("vllm._custom_ops"))


def check_reshape_and_cache() -> None:
    assert params(obj("vllm._custom_ops.cpu_attn_reshape_and_cache"))[:6] == [
        "key",
        "value",
        "key_cache",
        "value_cache",
        "slot_mapping",
        "isa",
    ]


def check_attention_with_kv_cache() -> None:
    assert params(obj("vllm._custom_ops.cpu_attention_with_kv_cache"))[:14] == [
        "query",
        "key_cache",
        "value_cache",
        "output",
        "query_start_loc",
        "seq_lens",
        "scale",
        "causal",
        "alibi_slopes",
        "sliding_window",
        "block_table",
        "softcap",
        "scheduler_metadata",
        "s_aux",
    ]


def check_scheduler_metadata() -> None:
    passed = {
        "num_reqs",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "seq_lens",
        "dtype",
        "query_start_loc",
        "causal",
        "sliding_window_size",
        "isa",
        "enable_kv_split",
        "kv_cache_dtype",
    }
    signature = inspect.signature(obj("vllm._custom_ops.cpu_attn_get_scheduler_metadata"))
    assert passed <= set(signature.parameters)
    assert all(p.default is not inspect.Parameter.empty for n, p in signature.parameters.items() if n not in passed)
    # As vLLM's metadata builder calls it.
    assert "enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV" in source(obj(f"{CPU_ATTN}.CPUAttentionMetadataBuilder"))


def check_get_attn_isa() -> None:
    assert params(obj(f"{CPU_ATTN}._get_attn_isa"))[:3] == ["dtype", "block_size", "head_size"]


def check_impl_forward() -> None:
    assert params(obj(f"{CPU_ATTN}.CPUAttentionBackendImpl.forward")) == [
        "self",
        "layer",
        "query",
        "key",
        "value",
        "kv_cache",
        "attn_metadata",
        "output",
        "output_scale",
        "output_block_scale",
    ]


def check_impl_attributes() -> None:
    init = obj(f"{CPU_ATTN}.CPUAttentionBackendImpl.__init__")
    for name in ("num_heads", "num_kv_heads", "head_size", "scale", "sliding_window", "kv_cache_dtype"):
        assert assigns(init, name), name


def check_attention_metadata() -> None:
    fields = {f.name for f in dataclasses.fields(obj(f"{CPU_ATTN}.CPUAttentionMetadata"))}
    assert {
        "num_actual_tokens",
        "max_query_len",
        "query_start_loc",
        "max_seq_len",
        "seq_lens",
        "block_table",
        "scheduler_metadata",
        "causal",
    } <= fields


def check_layer_isa() -> None:
    assert "layer.isa = self.isa" in source(obj(f"{CPU_ATTN}.CPUAttentionMetadataBuilder"))


def check_layer_impl() -> None:
    assert assigns(obj("vllm.model_executor.layers.attention.attention.Attention").__init__, "impl")


def check_kv_cache_layout() -> None:
    forward = source(obj(f"{CPU_ATTN}.CPUAttentionBackendImpl.forward"))
    assert "kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))" in forward
    assert "key_cache, value_cache = kv_cache.chunk(2, dim=2)" in forward


# --- engine.py -----------------------------------------------------------------------------------

ASYNC_LLM = "vllm.v1.engine.async_llm.AsyncLLM"
CORE_CLIENT = "vllm.v1.engine.core_client.AsyncMPClient"  # what AsyncLLM.engine_core is (DP clients extend it)


def check_engine_core() -> None:
    assert assigns(obj(ASYNC_LLM).__init__, "engine_core")


def check_engine_core_processes() -> None:
    """server/engines/vllm_adapter/engine.py polls the engine-core processes vLLM started."""
    resources = obj("vllm.v1.engine.core_client.BackgroundResources")
    assert "engine_manager" in {f.name for f in dataclasses.fields(resources)}
    assert assigns(obj("vllm.v1.engine.utils.CoreEngineProcManager").__init__, "processes")
    assert assigns(obj("vllm.v1.engine.core_client.MPClient").__init__, "resources")


def check_logprob_token_texts() -> None:
    """server/engines/vllm_adapter/engine.py memoizes the function the logprobs processor names."""
    import vllm.v1.engine.logprobs as logprobs

    assert "convert_ids_list_to_tokens(" in source(
        obj("vllm.v1.engine.logprobs.LogprobsProcessor._update_prompt_logprobs")
    )
    assert params(logprobs.convert_ids_list_to_tokens) == ["tokenizer", "token_ids"]


def check_pause_scheduler() -> None:
    signature = inspect.signature(obj(f"{CORE_CLIENT}.pause_scheduler_async"))
    assert {"mode", "clear_cache"} <= set(signature.parameters)
    assert "keep" in typing.get_args(obj("vllm.v1.engine.PauseMode"))


def check_resume_scheduler() -> None:
    assert params(obj(f"{CORE_CLIENT}.resume_scheduler_async")) == ["self"]


def check_add_request() -> None:
    llm = obj(ASYNC_LLM)
    assert params(llm.add_request)[:4] == ["self", "request_id", "prompt", "params"]
    # Rows carry their scheduling priority (server/engines/vllm_groups.py, vllm_engine.py).
    assert "priority" in params(llm.add_request) and "priority" in params(llm.generate)
    assert "RequestOutputCollector" in str(inspect.signature(llm.add_request).return_annotation)
    collector = obj("vllm.v1.engine.output_processor.RequestOutputCollector")
    for method in ("get_nowait", "get", "close"):
        assert callable(getattr(collector, method)), method


def check_iteration_details() -> None:
    """server/engines/vllm_stats.py reads each step's details (`enable_logging_iteration_details`)."""
    fields = {f.name for f in dataclasses.fields(obj("vllm.v1.metrics.stats.SchedulerIterationDetails"))}
    assert {"num_ctx_tokens", "num_generation_tokens", "elapsed_ms", "is_dummy"} <= fields
    assert "iteration_details" in {f.name for f in dataclasses.fields(obj("vllm.v1.metrics.stats.SchedulerStats"))}
    args = {f.name for f in dataclasses.fields(obj("vllm.engine.arg_utils.AsyncEngineArgs"))}
    assert {"enable_logging_iteration_details", "scheduling_policy"} <= args


def stats_fields(cls: str, *names: str) -> Callable[[], None]:
    """server/engines/vllm_adapter/stats.py reads these fields of a vLLM stats dataclass."""

    def check() -> None:
        assert set(names) <= {f.name for f in dataclasses.fields(obj(f"vllm.v1.metrics.stats.{cls}"))}

    return check


def check_iteration_stats() -> None:
    for name in ("num_preempted_reqs", "finished_requests"):
        assert assigns(obj("vllm.v1.metrics.stats.IterationStats").__init__, name), name


def check_stream_finished() -> None:
    assert isinstance(obj("vllm.outputs.STREAM_FINISHED"), obj("vllm.outputs.RequestOutput"))


def check_engine_dead_error() -> None:
    assert issubclass(obj("vllm.v1.engine.exceptions.EngineDeadError"), Exception)


def check_stat_logger_base() -> None:
    base = obj("vllm.v1.metrics.loggers.StatLoggerBase")
    assert params(base.__init__) == ["self", "vllm_config", "engine_index"]
    assert params(base.record)[:3] == ["self", "scheduler_stats", "iteration_stats"]
    assert callable(base.log_engine_initialized)


def check_prometheus_stat_logger() -> None:
    logger = obj("vllm.v1.metrics.loggers.PrometheusStatLogger")
    assert params(logger.__init__) == ["self", "vllm_config", "engine_indexes"]
    for method in ("record", "record_sleep_state", "record_admission_rejection", "log_engine_initialized", "log"):
        assert callable(getattr(logger, method)), method
    # vLLM adds its own unless a given logger is one: the silent one must count.
    assert "isinstance(global_stat_logger, PrometheusStatLogger)" in source(obj("vllm.v1.metrics.loggers"))


# --- platform.py, platform_plugin.py -------------------------------------------------------------


def check_cpu_platform_plugin() -> None:
    assert params(obj("vllm.platforms.cpu_platform_plugin")) == []


def check_cpu_platform() -> None:
    from server.engines.vllm_adapter.platform_plugin import CPU_PLATFORM

    platform = obj(CPU_PLATFORM)
    assert isinstance(platform.ray_device_key, str) and isinstance(platform.ray_noset_device_env_vars, list)


SYMBOLS: dict[str, Callable[[], None]] = {
    "rotary_embedding._ROPE_DICT": check_rope_dict,
    "rotary_embedding.get_rope": check_get_rope,
    "RotaryEmbedding.__init__(init_cache)": check_rotary_init,
    "RotaryEmbedding._match_cos_sin_cache_dtype": check_match_cos_sin_cache_dtype,
    "RotaryEmbedding.forward_native/cpu/cuda": check_table_forwards,
    "GPUModelRunner._preprocess": check_preprocess,
    "GPUModelRunner._update_states": check_update_states,
    "GPUModelRunner.load_model": check_load_model,
    "GPUModelRunner.input_batch": runner_attribute("input_batch"),
    "GPUModelRunner.requests": runner_attribute("requests"),
    "GPUModelRunner.positions": runner_attribute("positions"),
    "GPUModelRunner.discard_request_mask": check_discard_request_mask_np,
    "CPUModelRunner(GPUModelRunner)": check_cpu_runner_is_v1,
    "SchedulerOutput.finished_req_ids": scheduler_output_field("finished_req_ids"),
    "SchedulerOutput.preempted_req_ids": scheduler_output_field("preempted_req_ids"),
    "SchedulerOutput.num_scheduled_tokens": scheduler_output_field("num_scheduled_tokens"),
    "InputBatch.req_ids": check_input_batch_req_ids,
    "InputBatch.logitsprocs": check_input_batch_logitsprocs,
    "CachedRequestState.sampling_params": check_request_sampling_params,
    "CachedRequestState.num_prompt_tokens": check_request_prompt_length,
    "envs.VLLM_USE_V2_MODEL_RUNNER": vllm_env("VLLM_USE_V2_MODEL_RUNNER"),
    "cpu_worker.CPUWorker": check_cpu_worker,
    "gpu_worker.Worker": check_gpu_worker,
    "WorkerBase.parallel_config/local_rank": check_worker_base,
    "vllm._custom_ops": check_custom_ops,
    "_custom_ops.cpu_attn_reshape_and_cache": check_reshape_and_cache,
    "_custom_ops.cpu_attn_get_scheduler_metadata": check_scheduler_metadata,
    "_custom_ops.cpu_attention_with_kv_cache": check_attention_with_kv_cache,
    "cpu_attn._get_attn_isa": check_get_attn_isa,
    "CPUAttentionBackendImpl.forward": check_impl_forward,
    "CPUAttentionBackendImpl attributes": check_impl_attributes,
    "CPUAttentionMetadata fields": check_attention_metadata,
    "layer.isa": check_layer_isa,
    "Attention.impl": check_layer_impl,
    "CPU KV cache layout": check_kv_cache_layout,
    "envs.VLLM_CPU_ATTN_SPLIT_KV": vllm_env("VLLM_CPU_ATTN_SPLIT_KV"),
    "AsyncLLM.engine_core": check_engine_core,
    "BackgroundResources.engine_manager.processes": check_engine_core_processes,
    "logprobs.convert_ids_list_to_tokens": check_logprob_token_texts,
    "AsyncMPClient.pause_scheduler_async": check_pause_scheduler,
    "AsyncMPClient.resume_scheduler_async": check_resume_scheduler,
    "AsyncLLM.add_request -> RequestOutputCollector": check_add_request,
    "outputs.STREAM_FINISHED": check_stream_finished,
    "SchedulerStats.iteration_details": check_iteration_details,
    "SchedulerStats.kv_cache_usage/num_running_reqs/num_waiting_reqs": stats_fields(
        "SchedulerStats", "kv_cache_usage", "num_running_reqs", "num_waiting_reqs"
    ),
    "IterationStats.num_preempted_reqs/finished_requests": check_iteration_stats,
    "FinishedRequestStats fields": stats_fields(
        "FinishedRequestStats", "request_id", "queued_time", "prefill_time", "num_prompt_tokens", "num_cached_tokens"
    ),
    "EngineDeadError": check_engine_dead_error,
    "StatLoggerBase": check_stat_logger_base,
    "PrometheusStatLogger": check_prometheus_stat_logger,
    "platforms.cpu_platform_plugin": check_cpu_platform_plugin,
    "CpuPlatform.ray_device_key": check_cpu_platform,
}


@pytest.mark.parametrize("check", SYMBOLS.values(), ids=SYMBOLS.keys())
def test_vllm_still_has(check: Callable[[], None]) -> None:
    check()


def test_vllm_stats_become_engine_iterations() -> None:
    """The engine's conversion of vLLM's own stats objects (this vLLM version's classes)."""
    pytest.importorskip("vllm")
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

    from server.engines.base import EngineIteration, FinishedRow
    from server.engines.vllm_stats import iteration_from_vllm

    iteration = IterationStats()
    iteration.num_preempted_reqs = 2
    iteration.finished_requests = [
        FinishedRequestStats(FinishReason.LENGTH, request_id="a" * 32, queued_time=0.5, prefill_time=0.25),
        FinishedRequestStats(FinishReason.STOP, request_id=None, queued_time=1.0),
    ]
    got = iteration_from_vllm(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.5), iteration)
    assert got == EngineIteration(0.5, 3, 1, 2, (FinishedRow("a" * 32, 0.5, 0.25),))
    assert iteration_from_vllm(None, None) == EngineIteration()


# --- no other room names them ----------------------------------------------------------------------


def pattern(name: str) -> re.Pattern[str]:
    """`name` as a whole identifier (a leading "." keeps it to attribute access)."""
    before = "" if name.startswith(".") else r"(?<!\w)"
    return re.compile(before + re.escape(name) + r"(?!\w)")


def test_private_vllm_names_appear_only_in_the_adapter() -> None:
    here = Path(__file__).resolve()
    found: dict[str, list[str]] = {}
    for room in ("server", "strategies", "clients", "tests", "scripts"):
        for path in sorted((ROOT / room).rglob("*.py")):
            if path == here or ADAPTER in path.parents:
                continue
            text = path.read_text()
            names = [name for name in PRIVATE_NAMES if pattern(name).search(text)]
            if names:
                found[str(path.relative_to(ROOT))] = names
    assert found == {}


def test_every_private_name_is_used_in_the_adapter() -> None:
    """The list is the adapter's inventory: a name no longer used there leaves it."""
    text = "\n".join(p.read_text() for p in sorted(ADAPTER.glob("*.py")) if p.name != "__init__.py")
    assert [name for name in PRIVATE_NAMES if not pattern(name).search(text)] == []


# --- what vLLM loads by name ---------------------------------------------------------------------


def test_worker_classes_resolve_to_vllms_workers() -> None:
    from server.engines.multi_rope import WORKER_CLASSES
    from server.engines.vllm_adapter.cpu_worker import VllmCpuWorker
    from server.engines.vllm_adapter.gpu_worker import VllmGpuWorker

    assert issubclass(obj(WORKER_CLASSES["cpu"]), VllmCpuWorker)
    assert issubclass(obj(WORKER_CLASSES["gpu"]), VllmGpuWorker)


def test_the_platform_plugin_names_a_subclass_of_vllms_cpu_platform() -> None:
    from server.engines.cpu_ray import platform_plugin
    from server.engines.vllm_adapter.platform import VllmCpuPlatform
    from server.engines.vllm_engine import is_cpu_build

    if not is_cpu_build():
        pytest.skip("the plugin declines on GPU builds")
    named = platform_plugin()
    assert named is not None and issubclass(obj(named), VllmCpuPlatform)


def test_the_runner_hooks_shadow_nothing_of_vllms_runners() -> None:
    """The mixins' own names (hooks, accessors, their state) are new to vLLM's V1 runners: only the
    three methods the hooks are built on override vLLM's."""
    from server.engines.multi_rope.runner import MultiRopeRunner

    overridden = {"load_model", "_update_states", "_preprocess"}
    ours = {name for cls in (V1RunnerHooks, MultiRopeRunner) for name in vars(cls) if not name.startswith("__")}
    ours |= set(re.findall(SELF_ASSIGNED, source(MultiRopeRunner)))
    runners = [cls for cls in obj("vllm.v1.worker.cpu_model_runner.CPUModelRunner").__mro__ if cls is not object]
    assert obj(RUNNER) in runners
    theirs = {name for runner in runners for name in vars(runner)}
    theirs |= {name for runner in runners for name in re.findall(SELF_ASSIGNED, inspect.getsource(runner))}
    assert sorted((ours & theirs) - overridden) == []
    assert overridden <= theirs


# --- the V1 runner's hook points, on a stand-in for vLLM's runner (real engines: tests/e2e) ---------


def v1_runner_class() -> type:
    """vLLM's V1 runner with its three hooked methods stubbed (built without vLLM's constructor)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    class StubRunner(CPUModelRunner):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def load_model(self, *args: Any, **kwargs: Any) -> None:
            self.calls.append("vllm load_model")

        def _update_states(self, scheduler_output: Any) -> str:
            self.calls.append("vllm update")
            return "updated"

        def _preprocess(self, scheduler_output: Any, num_input_tokens: int, intermediate_tensors: Any = None) -> Any:
            self.calls.append("vllm preprocess")
            return ("ids", None, torch.arange(num_input_tokens), intermediate_tensors, {}, None)

    return StubRunner


class Recorder(V1RunnerHooks):
    calls: list[str]

    def on_model_loaded(self) -> None:
        self.calls.append("loaded")

    def on_rows_released(self, request_ids: Iterable[str]) -> None:
        self.calls.append(f"released {sorted(request_ids)}")

    def on_step_positions(self, step: Any, num_input_tokens: int, positions: torch.Tensor) -> torch.Tensor | None:
        self.calls.append("positions")
        return None if step.keep else positions + 100


def test_hooks_run_where_vllms_methods_do_and_their_positions_reach_the_model() -> None:
    runner = v1_runner_class()()
    mix_into_v1_runner(runner, Recorder, class_prefix="Recording", feature="recording")
    assert type(runner).__name__ == "RecordingStubRunner" and isinstance(runner, Recorder)

    runner.load_model()
    assert runner._update_states(SimpleNamespace(finished_req_ids={"a"}, preempted_req_ids=None)) == "updated"
    kept = runner._preprocess(SimpleNamespace(keep=True), 4, "tensors")
    shifted = runner._preprocess(SimpleNamespace(keep=False), 4, "tensors")

    assert runner.calls == [
        "vllm load_model",
        "loaded",
        "released ['a']",
        "released []",
        "vllm update",
        "vllm preprocess",
        "positions",
        "vllm preprocess",
        "positions",
    ]
    assert kept[2].tolist() == [0, 1, 2, 3]
    assert shifted[:2] == ("ids", None) and shifted[2].tolist() == [100, 101, 102, 103]
    assert shifted[3:] == ("tensors", {}, None)


def test_the_class_swap_is_made_once_per_runner_class_and_refuses_other_runners() -> None:
    stub = v1_runner_class()
    first, second = stub(), stub()
    mix_into_v1_runner(first, Recorder, class_prefix="Recording", feature="recording")
    mix_into_v1_runner(second, Recorder, class_prefix="Recording", feature="recording")
    assert type(first) is type(second)
    with pytest.raises(RuntimeError, match="recording needs vLLM's V1 model runner"):
        mix_into_v1_runner(SimpleNamespace(), Recorder, class_prefix="Recording", feature="recording")


def test_memoized_logprob_token_texts_are_the_functions_own() -> None:
    """Each id decoded once, the same texts as vLLM's own function, in the same order."""
    import random

    import vllm.v1.engine.logprobs as logprobs
    from transformers import AutoTokenizer

    from server.engines.vllm_adapter.engine import memoize_logprob_token_texts
    from server.ops.model_store import DEFAULT_MODEL_NAME, model_cache_dir

    path = model_cache_dir(None) / DEFAULT_MODEL_NAME
    if not path.is_dir():
        pytest.skip("the bundled model is not converted here (scripts/setup.sh does it)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    installed = logprobs.convert_ids_list_to_tokens  # memoized already where an engine was built
    original = getattr(installed, "__wrapped__", installed)
    logprobs.convert_ids_list_to_tokens = original
    try:
        memoize_logprob_token_texts()
        memoize_logprob_token_texts()  # once is enough
        memoized = logprobs.convert_ids_list_to_tokens
        assert memoized is not original and getattr(memoized, "memoized", False)
        assert memoized.__wrapped__ is original  # type: ignore[attr-defined]
        rng = random.Random(7)
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(3000)] * 2
        assert memoized(tokenizer, ids) == original(tokenizer, ids) == memoized(tokenizer, ids)
    finally:
        logprobs.convert_ids_list_to_tokens = installed
