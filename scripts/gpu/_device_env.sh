# Sourced by the scripts that run on a lent GPU machine (bench.sh, serving.sh, cold_start.sh, load_check.sh, tp.sh)
# after they set up their log: prints the machine, installs the carried wheels (.whl/: no network
# there) into /tmp/site, and exports the environment every run needs. $1: the script's name for the header line.
# The lent copy's .git can name an older commit than the working tree it carries: BLOOM_COMMIT (set in the run's
# command from this side's `git rev-parse`) names the tree that runs.
_commit=${BLOOM_COMMIT:-"$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (the copy's .git)"}
echo "== $(date -u +%FT%TZ) on $(hostname): scripts/gpu/$1 (commit $_commit)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || true
if ls .whl/*.whl >/dev/null 2>&1; then
  # Once per machine (a stamp names the wheels installed): the scripts of one device call share the install.
  _stamp=/tmp/site/.installed-$(ls .whl/*.whl | md5sum | cut -c1-12)
  [ -f "$_stamp" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch "$_stamp"; } || echo "wheel install failed: running with the image's packages"
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# NVLink multicast stays off (the lent machines' rule).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
