# Sourced by the GPU scripts: the wheels the GPU machine lacks (.gpu/wheels, ../shared/tools/gpu-wheels.sh) installed
# once per machine into /tmp/site, and the environment every script runs in. Once: a warm machine keeps /tmp/site,
# and two scripts run side by side in one call must not rewrite it under each other's imports.
if [ ! -f /tmp/site/.tcache-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl 2>&1 | tail -1
  touch /tmp/site/.tcache-installed
fi
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
