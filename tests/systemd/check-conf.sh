#!/bin/sh
# conf/adapterd.conf lists every option with its default (commented out), and parses.
#   check-conf.sh ADAPTERD CONF
set -eu
bin=$1 conf=$2
want=$(mktemp) got=$(mktemp)
trap 'rm -f "$want" "$got"' EXIT
"$bin" -c "$conf" --dump-config | grep -E '^[a-z_]+ =' | sed 's/ *$//' >"$want"
grep -E '^#[a-z_]+ =' "$conf" | sed -e 's/^#//' -e 's/ *$//' >"$got"
if ! diff -u "$want" "$got"; then
    echo "FAIL: $conf differs from the built-in options and defaults (- built in, + file)" >&2
    exit 1
fi
echo "conf: $(wc -l <"$want") options documented with their defaults"
