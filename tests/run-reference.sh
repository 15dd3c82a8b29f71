#!/bin/sh
# Runs a PyTorch reference script (Debian's python3-torch) that writes test cases into a temp
# directory, then the C checker on each case. Fails, never skips, when PyTorch is missing: that
# is a broken setup, not a pass.   run-reference.sh NAME REFERENCE.py CHECKER
set -eu
name=$1 ref=$2 exe=$3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
/usr/bin/python3 "$ref" "$out"
n=0 fail=0
for d in "$out"/*/; do
    n=$((n + 1))
    "$exe" "$d" || fail=$((fail + 1))
done
[ "$n" -gt 0 ] || { echo "$name: the reference produced no cases"; exit 1; }
echo "$name: $n cases, $fail failed"
[ "$fail" -eq 0 ]
