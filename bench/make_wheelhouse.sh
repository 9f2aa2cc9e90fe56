#!/usr/bin/env bash
# Fill bench/wheelhouse/ (gitignored) with the wheels that bench/gpu.sh needs on an offline GPU
# machine whose image already has torch, transformers and pyarrow: trl 1.16 with accelerate and
# datasets, dpocli's CLI dependencies (typer, rich), and everything they pull in except the
# image's big packages. Run it where the package index is reachable, then copy the folder along;
# gpu.sh installs from it with `pip install --no-index --find-links bench/wheelhouse`.
#
# Target (override through the environment): Linux x86_64, CPython $PY_VERSION (3.12), with the
# image's torch $IMAGE_TORCH, transformers $IMAGE_TRANSFORMERS and pyarrow $IMAGE_PYARROW. Those
# three take part in dependency resolution, so every wheel chosen here accepts them (datasets,
# for one, raised its pyarrow floor over time), but none of them is downloaded.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/bench/wheelhouse"
PY_VERSION="${PY_VERSION:-3.12}"
IMAGE_TORCH="${IMAGE_TORCH:-2.11.*}"
IMAGE_TRANSFORMERS="${IMAGE_TRANSFORMERS:-5.17.*}"
IMAGE_PYARROW="${IMAGE_PYARROW:-21.*}"
# Binary wheels for any manylinux glibc up to 2.28 (manylinux2014 = manylinux_2_17).
PLATFORMS=()
for glibc in $(seq 17 28); do PLATFORMS+=(--platform "manylinux_2_${glibc}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64)
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${PLATFORMS[@]}")
# The packages wanted; the image's own are named to constrain the resolution only.
WANTED=(trl==1.16.0 "accelerate>=1.10.1" "datasets>=4.7.0" "typer>=0.12" "rich>=13" "safetensors>=0.4")
IMAGE=("torch==$IMAGE_TORCH" "transformers==$IMAGE_TRANSFORMERS" "pyarrow==$IMAGE_PYARROW")
# Never downloaded: the image has them (torch's CUDA libraries are gigabytes).
SKIP='^(torch|transformers|pyarrow|triton|nvidia-.*|cuda-.*)$'

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Resolve without installing: pip reads wheel metadata, not the wheels, so torch is not fetched.
python3 -m pip install --quiet --dry-run --ignore-installed --target "$tmp/target" \
    --report "$tmp/report.json" "${TARGET[@]}" "${WANTED[@]}" "${IMAGE[@]}"
python3 - "$tmp/report.json" "$SKIP" "$tmp/pins.txt" "$OUT/requirements.txt" "${WANTED[@]}" <<'EOF'
import json, re, sys
report, skip, pins_path, req_path, *wanted = sys.argv[1:]
items = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
         for i in json.load(open(report))["install"]}
pins = sorted(f"{n}=={v}" for n, v in items.items() if not re.match(skip, n))
open(pins_path, "w").write("\n".join(pins) + "\n")
top = [re.split(r"[=<>]", w)[0].lower() for w in wanted]
import os
os.makedirs(os.path.dirname(req_path), exist_ok=True)
open(req_path, "w").write("".join(f"{n}=={items[n]}\n" for n in top))
print(f"{len(pins)} wheels to fetch; skipped: "
      + ", ".join(sorted(n for n in items if re.match(skip, n))), file=sys.stderr)
EOF
python3 -m pip download --quiet --no-deps --dest "$OUT" "${TARGET[@]}" -r "$tmp/pins.txt"
ls "$OUT"/*.whl | wc -l | xargs echo "wheels:" >&2
du -sh "$OUT" >&2
