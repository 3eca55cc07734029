#!/usr/bin/env bash
# Wheels the H200 verification machine lacks (Python 3.12, no network there), into .whl/:
# DeepSpeed (pure Python, built here), its hjson and pydantic, and setuptools + wheel for
# building our extensions there. Carry `.whl` with the device run, then on that machine:
#   pip install --no-index --no-deps --target "$PWD/.site" .whl/*.whl
#   export PYTHONPATH="$PWD/.site"
#   python3 tools/gpu_verify.py --out "$OUT/verify" --work /tmp/verify-work
# (see shared/notes/gpu-device.md; .whl/ is ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson pydantic pydantic-core annotated-types typing-inspection setuptools wheel
# pydantic pins its core exactly: keep the pair that agrees
python - <<'PY'
import re, zipfile, pathlib
whl = pathlib.Path(".whl")
pyd = next(whl.glob("pydantic-[0-9]*.whl"))
meta = zipfile.ZipFile(pyd).read(f"{pyd.name.split('-')[0]}-{pyd.name.split('-')[1]}.dist-info/METADATA").decode()
need = re.search(r"Requires-Dist: pydantic-core==([\d.]+)", meta).group(1)
cores = list(whl.glob("pydantic_core-*.whl"))
assert any(f"-{need}-" in c.name for c in cores), (need, [c.name for c in cores])
print(f"{pyd.name} needs pydantic-core {need}: present")
PY
ls -1 .whl
