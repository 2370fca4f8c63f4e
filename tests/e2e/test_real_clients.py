"""Unmodified third-party clients against the real server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from server.ops.model_store import default_checkpoint_dir
from tests.conftest import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_huggingface_inference_client(base_url):
    client = InferenceClient(base_url)
    text = client.text_generation(PROMPT, max_new_tokens=12)
    assert "Paris" in text
    detailed = client.text_generation(PROMPT, max_new_tokens=12, details=True)
    assert detailed.generated_text == text
    assert detailed.details.generated_tokens == len(detailed.details.tokens)
    assert detailed.details.finish_reason in ("length", "eos_token")
    streamed = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert "".join(streamed).startswith(text.split()[0])
    detailed_stream = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert detailed_stream[-1].generated_text == text


def test_openai_client(base_url):
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    completion = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"strategy": "native"},
    )
    assert "Paris" in completion.choices[0].text
    assert completion.usage.completion_tokens > 0
    chunks = list(
        client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_vllm_bench_serve_runs_against_ropeserve(base_url, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "clients.vllm_cli",
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        str(default_checkpoint_dir()),
        "--served-model-name",
        "SmolLM2-135M-Instruct",
        "--dataset-name",
        "random",
        "--random-input-len",
        "64",
        "--random-output-len",
        "8",
        "--num-prompts",
        "8",
        "--max-concurrency",
        "4",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "bench.json",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 8, result
    assert result.get("failed", 0) == 0
    assert result["total_output_tokens"] == 8 * 8
    assert result["median_ttft_ms"] > 0
