#ifndef GREET_H
#define GREET_H
/* greet writes a greeting for name into buf and returns buf. */
char *greet(char *buf, unsigned long n, const char *name);
#endif
