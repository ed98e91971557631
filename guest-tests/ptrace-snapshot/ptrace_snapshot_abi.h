/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The PTRACE_SNAPSHOT ABI of kernel-patches/ptrace-snapshot (include/uapi/linux/ptrace.h there).
 * The suite is built against the builder's libc headers, not the patched kernel's, so it carries
 * the ABI itself; the values must stay exactly those of the uapi header.
 */
#ifndef PTRACE_SNAPSHOT_ABI_H
#define PTRACE_SNAPSHOT_ABI_H

#include <linux/types.h>

#ifndef PTRACE_SNAPSHOT
#define PTRACE_SNAPSHOT		0x4240
#define PTRACE_RESTORE		0x4241
#define PTRACE_GETSNAPSHOT	0x4242
#define PTRACE_SNAPSHOT_MAX_LEN		(1UL << 20)	/* one snapshot */
#define PTRACE_SNAPSHOT_MAX_TOTAL	(4UL << 20)	/* one tracee */
#define PTRACE_SNAPSHOT_MAX_COUNT	1024UL		/* one tracee */

struct ptrace_snapshot_buf {
	__u64 buf;	/* tracer address to copy the snapshot into */
	__u64 len;	/* size of that buffer in bytes */
};
#endif

#endif /* PTRACE_SNAPSHOT_ABI_H */
