#include <stdio.h>

#include "lib/greet.h"

int main(int argc, char **argv) {
  char buf[128];
  puts(greet(buf, sizeof buf, argc > 1 ? argv[1] : "kiln"));
  return 0;
}
