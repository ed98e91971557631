/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * tracer_workload - exact workloads for the tracer module's tests: the ioctl
 * interface of /dev/tracer_workload, shared with user space.
 */

#ifndef TRACER_WORKLOAD_H__
#define TRACER_WORKLOAD_H__ 1

#include <linux/ioctl.h>
#include <linux/types.h>

#define WL_DEV_NAME	"tracer_workload"
#define WL_MAX_COUNT	1024

/* struct wl_run.ops */
#define WL_OP_KMALLOC	0x1	/* count x (kmalloc(size + i * step), then kfree) */
#define WL_OP_MUTEX	0x2	/* count x (mutex_lock, mutex_unlock) */
#define WL_OP_SEM	0x4	/* count x (down_interruptible, up) */
#define WL_OP_SCHED	0x8	/* count x schedule_timeout_interruptible(1) */
#define WL_OP_ALL	0xf	/* the operations above: one per column */
/* count x kmalloc(size + i * step), then one kfree_bulk() of them all */
#define WL_OP_BULK	0x10
/* count x kmalloc(size + i * step), then count x kvfree_rcu(ptr) */
#define WL_OP_KFREE_RCU	0x20
#define WL_OP_VALID	0x3f

/* struct wl_run.flags */
#define WL_PARK		0x1	/* park before and after the work (below) */

struct wl_run {
	__u32 count;
	__u32 size;
	__u32 step;
	__u32 ops;
	__u32 flags;
};

/* The phases of a parked run, as WL_WAIT sees them. */
#define WL_IDLE		0
#define WL_PARKED_BEFORE 1
#define WL_GO		2
#define WL_PARKED_AFTER	3
#define WL_FINISH	4

/* Run the work in the caller's context. */
#define WL_RUN		_IOW('W', 1, struct wl_run)
/* Wait (at most 30 s) until the run on this open file is in phase arg. */
#define WL_WAIT		_IO('W', 2)
/* Let a parked run go on: PARKED_BEFORE -> GO, PARKED_AFTER -> FINISH. */
#define WL_RELEASE	_IO('W', 3)
/* Call a function with a kprobe whose handler calls kfree(NULL), arg times. */
#define WL_MISS		_IO('W', 4)
/*
 * Leak arg blocks of WL_LEAK_SIZE bytes (kmalloc, never freed, no pointer
 * kept): the positive control of the suite's kmemleak check.
 */
#define WL_LEAK		_IO('W', 5)
#define WL_LEAK_SIZE	777

#endif /* TRACER_WORKLOAD_H__ */
