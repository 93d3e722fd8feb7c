#!/usr/bin/env bash
# check-large-files.sh fails when git tracks a file over 1 MiB that is not listed in
# scripts/large-files.allow with the test that keeps it fresh. Committed builds (a
# 36 MB kiln binary once) bloat every clone forever and go stale silently.
#   check-large-files.sh [REPO]     check REPO (default: this checkout)
#   check-large-files.sh --self-test    prove the check fails on a large file
set -euo pipefail
limit=$((1 << 20))
here=$(cd "$(dirname "$0")" && pwd)

check() {
	local repo=$1 allow=$1/scripts/large-files.allow bad=0 path size test
	declare -A allowed=()
	if [[ -f $allow ]]; then
		while read -r path test _; do
			[[ -z $path || $path == \#* ]] && continue
			if [[ -z ${test:-} ]]; then
				echo "$allow: $path names no freshness test" >&2
				bad=1
				continue
			fi
			if ! grep -rqs --include='*_test.go' "^func $test(" "$repo"; then
				echo "$allow: $path: freshness test $test not found" >&2
				bad=1
			fi
			allowed[$path]=1
		done <"$allow"
	fi
	while IFS= read -r -d '' path; do
		[[ -f $repo/$path && ! -L $repo/$path ]] || continue
		size=$(stat -c %s "$repo/$path")
		if ((size > limit)) && [[ -z ${allowed[$path]:-} ]]; then
			echo "$path: $size bytes tracked by git (over 1 MiB and not in scripts/large-files.allow)" >&2
			bad=1
		fi
	done < <(git -C "$repo" ls-files -z)
	return $bad
}

self_test() {
	local tmp
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' RETURN
	git -C "$tmp" init -q
	mkdir -p "$tmp/scripts"
	printf 'package x\n\nimport "testing"\n\nfunc TestAssetIsFresh(t *testing.T) {}\n' >"$tmp/asset_test.go"
	head -c $limit /dev/zero >"$tmp/exactly-1MiB"
	git -C "$tmp" add -A
	check "$tmp" 2>/dev/null || { echo "self-test: a file of exactly 1 MiB was refused" >&2; return 1; }
	head -c $((limit + 1)) /dev/zero >"$tmp/kiln"
	git -C "$tmp" add kiln
	if check "$tmp" 2>/dev/null; then
		echo "self-test: a tracked file over 1 MiB passed" >&2
		return 1
	fi
	echo "kiln TestAssetIsFresh" >"$tmp/scripts/large-files.allow"
	check "$tmp" 2>/dev/null || { echo "self-test: an allowed asset was refused" >&2; return 1; }
	echo "kiln TestNoSuchTest" >"$tmp/scripts/large-files.allow"
	if check "$tmp" 2>/dev/null; then
		echo "self-test: an asset whose freshness test does not exist passed" >&2
		return 1
	fi
	echo "kiln" >"$tmp/scripts/large-files.allow"
	if check "$tmp" 2>/dev/null; then
		echo "self-test: an asset without a freshness test passed" >&2
		return 1
	fi
	echo "check-large-files: self-test passed"
}

case ${1:-} in
--self-test) self_test ;;
"") check "$(cd "$here/.." && pwd)" ;;
*) check "$1" ;;
esac
