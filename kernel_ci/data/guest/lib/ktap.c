// SPDX-License-Identifier: GPL-2.0
/*
 * ktap.c - the KTAP version 1 printer behind ktap.h.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ktap.h"

#define KTAP_MAX_DEPTH	8
#define KTAP_NAME_MAX	256

struct ktap_level {
	unsigned int number;	/* results printed at this level */
	unsigned int failed;
	unsigned int skipped;
	unsigned int planned;	/* 0: no plan line */
	struct timespec start;
	char name[KTAP_NAME_MAX];
};

static struct ktap_level levels[KTAP_MAX_DEPTH];
static int depth;
static bool started;

static struct ktap_level *current(void)
{
	return &levels[depth];
}

static void start(void)
{
	if (started)
		return;
	started = true;
	fputs("KTAP version 1\n", stdout);
}

static void indent(void)
{
	int i;

	for (i = 0; i < depth; i++)
		fputs("    ", stdout);
}

static void end_line(void)
{
	putchar('\n');
	fflush(stdout);
}

/* A description may not contain '#' (it starts the directive) nor a line break. */
static void sanitize(char *text)
{
	for (; *text; text++)
		if (*text == '#' || *text == '\n' || *text == '\r')
			*text = '_';
}

static double seconds_since(const struct timespec *from)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - from->tv_sec) + (now.tv_nsec - from->tv_nsec) / 1e9;
}

static void result(bool ok, const char *name, const char *directive)
{
	struct ktap_level *level = current();

	level->number++;
	if (!ok)
		level->failed++;
	indent();
	printf("%s %u %s", ok ? "ok" : "not ok", level->number, name);
	if (directive && *directive)
		printf(" # %s", directive);
	end_line();
}

void ktap_plan(unsigned int count)
{
	start();
	current()->planned = count;
	indent();
	printf("1..%u", count);
	end_line();
}

bool ktap_ok(bool cond, const char *fmt, ...)
{
	char name[KTAP_NAME_MAX];
	va_list ap;

	start();
	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	sanitize(name);
	result(cond, name, NULL);
	return cond;
}

void ktap_skip(const char *name, const char *fmt, ...)
{
	char clean[KTAP_NAME_MAX];
	char directive[KTAP_NAME_MAX + 8];
	char reason[KTAP_NAME_MAX];
	va_list ap;

	start();
	va_start(ap, fmt);
	vsnprintf(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	snprintf(clean, sizeof(clean), "%s", name);
	sanitize(clean);
	sanitize(reason);
	snprintf(directive, sizeof(directive), "SKIP %s", reason);
	current()->skipped++;
	result(true, clean, directive);
}

void ktap_diag(const char *fmt, ...)
{
	va_list ap;

	start();
	indent();
	fputs("# ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	end_line();
}

void ktap_subtest_begin(const char *name)
{
	struct ktap_level *level;

	start();
	if (depth + 1 >= KTAP_MAX_DEPTH) {
		fprintf(stderr, "ktap: subtests nested deeper than %d\n", KTAP_MAX_DEPTH);
		abort();
	}
	depth++;
	level = current();
	memset(level, 0, sizeof(*level));
	snprintf(level->name, sizeof(level->name), "%s", name);
	sanitize(level->name);
	clock_gettime(CLOCK_MONOTONIC, &level->start);
	indent();
	fputs("KTAP version 1", stdout);
	end_line();
	indent();
	printf("# Subtest: %s", level->name);
	end_line();
}

static bool plan_kept(const struct ktap_level *level)
{
	if (!level->planned || level->planned == level->number)
		return true;
	ktap_diag("planned %u tests but ran %u", level->planned, level->number);
	return false;
}

bool ktap_subtest_end(void)
{
	struct ktap_level *level = current();
	char directive[64];
	bool ok;

	if (depth == 0)
		return current()->failed == 0;
	ok = plan_kept(level) && level->failed == 0;
	depth--;
	if (ok && level->number > 0 && level->skipped == level->number) {
		current()->skipped++;
		result(true, level->name, "SKIP all checks skipped");
	} else {
		snprintf(directive, sizeof(directive), "time=%.3fs", seconds_since(&level->start));
		result(ok, level->name, directive);
	}
	return ok;
}

int ktap_finish(void)
{
	struct ktap_level *top = &levels[0];
	bool ok;

	start();
	while (depth > 0)
		ktap_subtest_end();
	ok = plan_kept(top) && top->failed == 0;
	ktap_diag("Totals: pass:%u fail:%u skip:%u", top->number - top->failed - top->skipped,
		  top->failed, top->skipped);
	return ok ? 0 : 1;
}

int ktap_run(const struct ktap_case *cases, size_t count)
{
	size_t i;

	ktap_plan(count);
	for (i = 0; i < count; i++) {
		ktap_subtest_begin(cases[i].name);
		cases[i].run();
		ktap_subtest_end();
	}
	return ktap_finish();
}
