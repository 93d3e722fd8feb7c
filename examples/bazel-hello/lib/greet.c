#include <stdio.h>

#include "lib/greet.h"
#include "lib/version.h"

char *greet(char *buf, unsigned long n, const char *name) {
  snprintf(buf, n, "hello, %s (greet %s)", name, GREET_VERSION);
  return buf;
}
