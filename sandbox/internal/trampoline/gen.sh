#!/bin/sh
# gen.sh rebuilds kiln-init (src/kiln-init.c) into kiln-init.amd64, the binary embedded in
# package trampoline. Run by `go generate`; the output is committed so that building
# kiln needs no extra step, and TestEmbeddedIsFresh checks it matches the source.
set -eu
cd "$(dirname "$0")"
${CC:-gcc} -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-asynchronous-unwind-tables \
  -fno-pie -no-pie -fno-builtin -fcf-protection=none -Wall -Werror \
  -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-z,norelro -s -o "${1:-kiln-init.amd64}" src/kiln-init.c
