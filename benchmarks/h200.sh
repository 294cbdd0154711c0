#!/usr/bin/env bash
# One device call on the lent H200: set up, then run the named stages in order; logs go to $OUT/<stage>.log.
#   benchmarks/h200.sh baseline check fa3          (issue 10: before/after, selfcheck, pytest -m cuda)
#   benchmarks/h200.sh diffusers varlen_host tox   (issue 11 benchmarks; tox -e cuda as written;
#                                                    DIFFUSERS_ARGS=--key-pages adds the K/V-as-pages A/B;
#                                                    diffusers_graphs: compiled rows in CUDA graphs, reduce-overhead)
#   benchmarks/h200.sh transformers                 (issue 13: Llama- and Gemma-2-like models, sdpa/eager vs attn_dispatch)
#   benchmarks/h200.sh conformance                  (issue 12: the full grids without and with the known-wrong guard)
#   benchmarks/h200.sh paged                        (issue 13: generate_batch only, with the teacher-forced token check)
#   benchmarks/h200.sh transformers_host            (where a decode step's host time goes, sdpa vs attn_dispatch;
#                                                    DIAG_ARGS="--model gemma2 --profile" for the Gemma-2-like model)
#   DIAG_ARGS=--compiled benchmarks/h200.sh diag   (diffusers host time per forward and call; --compiled: compiled too)
#   benchmarks/h200.sh leftpad                      (FA3 reading left-padded rows in place: groundwork, see the script)
#   benchmarks/h200.sh plan_host                    (host us of a decode step's page table, plan, run, metadata)
#   benchmarks/h200.sh metadata                     (FA3 calls with vs without scheduler metadata made once: paired A/B)
# Needs in carry: .carry (../shared/device/fa3-site.sh, ../shared/device/wheels.sh, .ci/gpu-wheels.sh) and,
# for the "baseline" stage, .baseline (a `git archive` of the commit to compare against).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -c "import zipfile; zipfile.ZipFile('.carry/fa3-site.zip').extractall('/tmp/site')"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
root=$PWD
install_tree() {  # editable installs of one checkout's distributions (setuptools only, no index)
  local dists=(. plugins/cuda_fa3 plugins/rocm_mxfp4 plugins/rocm_nsa plugins/varlen_diffusion)
  [[ -d $1/plugins/flash ]] && dists=(. plugins/flash "${dists[@]:1}")
  (cd "$1" && python3 -m pip install -q --no-deps --no-build-isolation --no-index $(printf -- '-e %s ' "${dists[@]}"))
}
run() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee -a "$OUT/$name.log"; echo "== $name rc=${PIPESTATUS[0]}"; }
for stage in "$@"; do
  case $stage in
    baseline)
      install_tree "$root/.baseline"
      (cd "$root/.baseline" && run baseline python3 benchmarks/bench_fa3.py --quick \
        && run baseline python3 benchmarks/bench_dispatch_overhead.py)
      python3 -m pip uninstall -q -y attn-dispatch attn-dispatch-cuda-fa3 attn-dispatch-rocm-mxfp4 \
        attn-dispatch-rocm-nsa attn-dispatch-varlen-diffusion ;;
    check)
      install_tree "$root"
      run check attn-dispatch info
      run check attn-dispatch selfcheck
      run check python3 -m pytest -q -m cuda -p no:cacheprovider --timeout 600 ;;
    fa3)
      install_tree "$root"
      run fa3 python3 benchmarks/diag_fa3_call_layout.py
      run fa3 python3 benchmarks/bench_fa3.py --quick
      run fa3 python3 benchmarks/bench_dispatch_overhead.py ;;
    diffusers)
      install_tree "$root"
      run diffusers python3 benchmarks/bench_diffusers.py --json "$OUT/diffusers.json" ${DIFFUSERS_ARGS:-} ;;
    diffusers_graphs)
      install_tree "$root"
      run diffusers_graphs python3 benchmarks/bench_diffusers.py --compile-mode reduce-overhead --no-prx \
        --json "$OUT/diffusers_graphs.json" ${DIFFUSERS_ARGS:-} ;;
    diag)
      install_tree "$root"
      run diag python3 benchmarks/diag_diffusers_host.py ${DIAG_ARGS:-} ;;
    conformance)
      install_tree "$root"
      run conformance python3 benchmarks/conformance_report.py --full --unguarded
      run conformance python3 benchmarks/conformance_report.py --full
      run conformance python3 benchmarks/diag_fa3_sweep.py ;;
    guard)
      install_tree "$root"
      run guard python3 benchmarks/diag_fa3_guard.py "${GUARD_ARGS:-}" ;;
    transformers)
      install_tree "$root"
      run transformers python3 benchmarks/bench_transformers.py --json "$OUT/transformers.json" ${TRANSFORMERS_ARGS:-} ;;
    transformers_host)
      install_tree "$root"
      run transformers_host python3 benchmarks/diag_transformers_host.py ${DIAG_ARGS:-} ;;
    paged)
      install_tree "$root"
      run paged python3 benchmarks/bench_transformers.py --paged-only --json "$OUT/paged.json" ;;
    leftpad)
      install_tree "$root"
      run leftpad python3 benchmarks/diag_fa3_leftpad.py ;;
    plan_host)
      install_tree "$root"
      run plan_host python3 benchmarks/diag_plan_host.py ;;
    metadata)
      install_tree "$root"
      run metadata python3 benchmarks/diag_fa3_metadata.py ;;
    varlen_host)
      install_tree "$root"
      run varlen_host python3 benchmarks/bench_varlen_host.py --out "$OUT" ;;
    tox)
      run tox .ci/tox-offline -e cuda ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
