// Shared helpers of the cellvm test init (testinit.c).
#pragma once
#include <time.h>

void fail(const char *check, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
void result(const char *key, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
double now_ns(clockid_t clk);
const char *param(const char *name);
int loops(int full);

void check_isolation(void);       // isolation.c
void check_vector_registers(void); // vector.c
