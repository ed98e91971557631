// SPDX-License-Identifier: GPL-2.0
/*
 * ci-smoke: the kernel under test carries this repository's ci-smoke patch series
 * (kernel-patches/ci-smoke), which adds /proc/ci-smoke. A kernel built without the series fails
 * "exists" (and skips "content"): that is what the suite is for.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "../lib/ktap.h"

#define PROC_CI_SMOKE	"/proc/ci-smoke"
#define CI_SMOKE_TEXT	"ci-smoke: patch applied"

/* Diagnostics go before the result line they explain (ktap.rst). */

KTAP_TEST(proc_ci_smoke)
{
	char text[256];
	size_t len;
	FILE *file;
	bool same;

	file = fopen(PROC_CI_SMOKE, "r");
	if (!file) {
		ktap_diag("%s: %s", PROC_CI_SMOKE, strerror(errno));
		ktap_ok(false, "exists");
		ktap_skip("content", "%s cannot be read", PROC_CI_SMOKE);
		return;
	}
	ktap_ok(true, "exists");
	len = fread(text, 1, sizeof(text) - 1, file);
	fclose(file);
	text[len] = '\0';
	while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r'))
		text[--len] = '\0';
	same = strcmp(text, CI_SMOKE_TEXT) == 0;
	if (!same)
		ktap_diag("read \"%s\", expected \"%s\"", text, CI_SMOKE_TEXT);
	ktap_ok(same, "content");
}

static const struct ktap_case cases[] = {
	KTAP_CASE(proc_ci_smoke),
};

int main(void)
{
	return ktap_run(cases, KTAP_ARRAY_SIZE(cases));
}
