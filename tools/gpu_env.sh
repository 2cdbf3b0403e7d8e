# Sourced by tools/gpu_check.sh and tools/gpu_suite.sh: the environment of a lent GPU machine.
#
# Its image has JAX with CUDA, flax, torch, pytest, pytest-xdist, hypothesis and jaxtyping, but not
# beartype (pyproject's pytest addopts name it) and no package index. Wheels it lacks travel in ./.whl
# (ignored by git: `echo /.whl/ >> .git/info/exclude`, then, here,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl beartype==0.23.1
# and name .whl in the device call's carry); they are unpacked onto PYTHONPATH, never installed.
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-.}
if ! $PY -c "import beartype" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
