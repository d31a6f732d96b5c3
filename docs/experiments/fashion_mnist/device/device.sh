#!/usr/bin/env bash
# What the lent GPU machine needs to run the workflow, packed here and unpacked there
# (README "How it ran on the lent GPU"). The machine has PyTorch, NumPy, SciPy, pandas & co. but
# none of the workflow's own packages, no internet, and a call carries at most 64 MiB.
#
#   device.sh pack DIR     (here) wheels for CPython 3.12 of the packages below into DIR/wheels,
#                          the two Fashion-MNIST train archives into DIR/data
#   device.sh unpack DIR   (there) installs each wheel whose distribution is not already
#                          installed into /tmp/site (prepend it to PYTHONPATH), copies the archives
#                          to the config's file:// folder (either may be missing: two calls can
#                          carry them)
set -euo pipefail
# The workflow's dependencies (pyproject.toml, the `workflow` extra) that the GPU image lacks, and
# theirs, with the versions `make install` resolves here; connection_pool has no wheel on PyPI.
PACKAGES=(
    snakemake==9.27.1 snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
    snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
    snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
    yte==1.9.4 dpath==2.2.0 ConfigArgParse==1.9.0 argparse-dataclass==2.0.0 conda-inject==1.3.2
    immutables==0.21 throttler==1.2.3 smart_open==7.7.1 wrapt==2.5.2 humanfriendly==10.0
    reretry==0.11.8 tabulate==0.10.0 docutils==0.22.4 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
    nbformat==5.11.1 fastjsonschema==2.22.3 jupyter_core==5.9.1 traitlets==5.16.1 platformdirs==4.14.9
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    attrs==26.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    sqlmodel==0.0.37 SQLAlchemy==2.0.58 greenlet==3.5.6 tenacity==9.2.1 psutil==7.2.2
    clean-fid==0.1.35 torch-pruning==1.4.0 diffusers==0.42.1 timm==1.0.31 lmdb==3.0.0
    regex==2026.12.2 importlib_metadata==10.2.0 zipp==4.1.2
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_5_x86_64)
DATA=/usr/share/datasets/fashion-mnist   # config/fashion_mnist.yaml's url

case "${1:-}" in
pack)
    out=$2
    mkdir -p "$out/wheels" "$out/data"
    for spec in "${PACKAGES[@]}"; do
        [ "${spec%%==*}" = connection_pool ] && continue
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${PLATFORMS[@]}" -d "$out/wheels" "$spec"
    done
    python3 -m pip wheel -q --no-deps -w "$out/wheels" connection_pool==0.0.3
    cp "$DATA"/train-images-idx3-ubyte.gz "$DATA"/train-labels-idx1-ubyte.gz "$out/data/"
    du -sh "$out"/* ;;
unpack)
    src=$2
    mkdir -p /tmp/site "$DATA"
    missing=()
    for wheel in "$src"/wheels/*.whl; do
        [ -f "$wheel" ] || continue
        dist=$(basename "$wheel" | cut -d- -f1)
        python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null \
            || missing+=("$wheel")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            "${missing[@]}"
    fi
    if compgen -G "$src/data/*.gz" > /dev/null; then cp "$src"/data/*.gz "$DATA"/; fi
    echo "installed ${#missing[@]} wheels into /tmp/site" ;;
*)
    echo "usage: $0 pack DIR | unpack DIR" >&2; exit 2 ;;
esac
