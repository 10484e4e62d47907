#!/usr/bin/env bash
# A separate virtual environment for llm-compressor 0.14 (it pins transformers <= 5.17, moelab
# pins 5.24): never installed into moelab's own environment. torch first and pinned, from disk.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-llmc}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet llmcompressor==0.14.0
"$VENV/bin/python" -c "import llmcompressor, transformers; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__)"
