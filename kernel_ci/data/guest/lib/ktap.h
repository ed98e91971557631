/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ktap.h - print KTAP version 1 (Documentation/dev-tools/ktap.rst) from a guest test.
 *
 * Table style: each case is a subtest whose checks are its results.
 *
 *	KTAP_TEST(release_matches)
 *	{
 *		ktap_ok(strcmp(a, b) == 0, "release");
 *	}
 *
 *	static const struct ktap_case cases[] = { KTAP_CASE(release_matches) };
 *
 *	int main(void)
 *	{
 *		return ktap_run(cases, KTAP_ARRAY_SIZE(cases));
 *	}
 *
 * Or by hand: ktap_plan(n), ktap_ok()/ktap_skip() n times, return ktap_finish().
 * ktap_subtest_begin()/ktap_subtest_end() nest (four spaces per level). Every line is
 * flushed at once, so a test killed mid-way still leaves what it printed.
 */
#ifndef KCI_KTAP_H
#define KCI_KTAP_H

#include <stdbool.h>
#include <stddef.h>

struct ktap_case {
	const char *name;
	void (*run)(void);
};

#define KTAP_TEST(fn)		static void fn(void)
#define KTAP_CASE(fn)		{ .name = #fn, .run = fn }
#define KTAP_ARRAY_SIZE(a)	(sizeof(a) / sizeof((a)[0]))

#define KTAP_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))

/* "1..count" for the current level (prints the version line first at the top). */
void ktap_plan(unsigned int count);

/* "ok N name" or "not ok N name"; returns cond so a test can stop early. */
bool ktap_ok(bool cond, const char *fmt, ...) KTAP_PRINTF(2, 3);

/* "ok N name # SKIP reason". */
void ktap_skip(const char *name, const char *fmt, ...) KTAP_PRINTF(2, 3);

/* "# text": shown with the result that follows it. */
void ktap_diag(const char *fmt, ...) KTAP_PRINTF(1, 2);

/* Open a nested block named name; its end prints the parent's result from its checks. */
void ktap_subtest_begin(const char *name);
bool ktap_subtest_end(void);

/* Close open blocks, check the plan; returns the exit status (0: nothing failed, 1: a failure). */
int ktap_finish(void);

/* Plan, run each case as a subtest, finish. */
int ktap_run(const struct ktap_case *cases, size_t count);

#endif /* KCI_KTAP_H */
