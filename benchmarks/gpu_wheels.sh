#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, no network there) that its image lacks and `rtk serve` needs:
# the server stack and Triton's HTTP client, at the versions this project's .venv resolved. They land in .whl/
# (git-ignored through .git/info/exclude); a device call carries `.whl` and installs them with
#   python3 -m pip install -q --no-index --no-deps --target $HOME/site .whl/*.whl
# onnxruntime-gpu travels separately (../shared/device/prepare-ort-gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 uvicorn==0.54.0 h11==0.16.0 httptools==0.9.0 uvloop==0.23.0 python-multipart==0.0.34 \
  tritonclient==2.73.0 geventhttpclient==2.6.1 gevent==26.9.0 greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 \
  brotli==1.2.1 python-rapidjson==1.25
du -sh .whl && ls .whl
