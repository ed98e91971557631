// SPDX-License-Identifier: GPL-2.0
/*
 * smoke-c: the guest runs the kernel that was built (its release is the build's), the kci_smoke
 * module built against it was loaded by the runner, and a suite can leave an artifact. Nothing here
 * depends on a project's patches: it passes on any kernel kernel-ci builds (with CONFIG_MODULES).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include "../lib/ktap.h"

#define SYS_MODULE	"/sys/module/kci_smoke"
#define TAG_PARAM	SYS_MODULE "/parameters/tag"
#define TAG_DEFAULT	"smoke"
#define ARTIFACT	"smoke-c.txt"

/* Diagnostics go before the result line they explain (ktap.rst). */

KTAP_TEST(uname_release)
{
	const char *want = getenv("KCI_KERNEL_RELEASE");
	struct utsname uts;
	bool same;

	if (!want || !*want) {
		ktap_skip("release_matches", "KCI_KERNEL_RELEASE is not set");
		return;
	}
	if (uname(&uts) != 0) {
		ktap_diag("uname: %s", strerror(errno));
		ktap_ok(false, "release_matches");
		return;
	}
	same = strcmp(uts.release, want) == 0;
	if (!same)
		ktap_diag("uname -r is %s, expected %s", uts.release, want);
	ktap_ok(same, "release_matches");
}

KTAP_TEST(module_loaded)
{
	struct stat st;
	int err = stat(SYS_MODULE, &st) == 0 ? 0 : errno;
	bool present = !err && S_ISDIR(st.st_mode);

	char tag[64] = "";
	FILE *file;

	if (!present)
		ktap_diag("%s: %s", SYS_MODULE, err ? strerror(err) : "not a directory");
	ktap_ok(present, "sysfs_entry");
	if (!present) {
		ktap_skip("tag_parameter", "the module is not loaded");
		return;
	}
	file = fopen(TAG_PARAM, "r");
	if (file) {
		if (!fgets(tag, sizeof(tag), file))
			tag[0] = '\0';
		fclose(file);
		tag[strcspn(tag, "\n")] = '\0';
		if (strcmp(tag, TAG_DEFAULT) != 0)
			ktap_diag("%s reads \"%s\", expected \"%s\"", TAG_PARAM, tag, TAG_DEFAULT);
	} else {
		ktap_diag("%s: %s", TAG_PARAM, strerror(errno));
	}
	ktap_ok(file && strcmp(tag, TAG_DEFAULT) == 0, "tag_parameter");
}

KTAP_TEST(artifact)
{
	const char *dir = getenv("KCI_ARTIFACTS");
	char path[4096];
	struct utsname uts;
	FILE *file;

	if (!dir || !*dir) {
		ktap_skip("written", "KCI_ARTIFACTS is not set");
		return;
	}
	snprintf(path, sizeof(path), "%s/%s", dir, ARTIFACT);
	file = fopen(path, "w");
	if (!file) {
		ktap_diag("%s: %s", path, strerror(errno));
		ktap_ok(false, "written");
		return;
	}
	if (uname(&uts) != 0)
		strcpy(uts.release, "unknown");
	fprintf(file, "smoke-c ran on %s\n", uts.release);
	ktap_ok(fclose(file) == 0, "written");
}

static const struct ktap_case cases[] = {
	KTAP_CASE(uname_release),
	KTAP_CASE(module_loaded),
	KTAP_CASE(artifact),
};

int main(void)
{
	return ktap_run(cases, KTAP_ARRAY_SIZE(cases));
}
