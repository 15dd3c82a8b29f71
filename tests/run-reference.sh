#!/bin/sh
# Parity suite: the PyTorch reference writes tiny random models and logits, adapterd must match.
# Fails (never skips) when PyTorch is missing: that is a broken setup, not a pass.
set -eu
ref=$1 exe=$2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
/usr/bin/python3 "$ref" "$out"
n=0 fail=0
for d in "$out"/*/; do
    n=$((n + 1))
    "$exe" "$d" || fail=$((fail + 1))
done
[ "$n" -gt 0 ] || { echo "reference produced no cases"; exit 1; }
echo "parity: $n cases, $fail failed"
[ "$fail" -eq 0 ]
