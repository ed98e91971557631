// SPDX-License-Identifier: GPL-2.0
/*
 * tracer_workload - exact workloads for the tracer module's tests.
 *
 * /dev/tracer_workload (misc, dynamic minor). WL_RUN does, in the context of
 * the calling process, exactly count x kmalloc (a run-time size, so
 * __kmalloc) of size + i * step bytes followed by their count x kfree,
 * count x mutex_lock/mutex_unlock, count x down_interruptible/up and
 * count x schedule_timeout_interruptible(1) (one schedule() each); and
 * frees that bypass kfree(): count x kmalloc freed by one kfree_bulk(), or
 * each by kvfree_rcu() (freed later, in batches, by kfree_bulk()).
 *
 * With WL_PARK the run parks before and after the work: it busy-waits in the
 * kernel (cond_resched(), which never calls schedule()) until another
 * process sharing the open file releases it with WL_RELEASE. A reader can
 * therefore snapshot /proc/tracer while the worker is parked on both sides,
 * and the difference is the work and nothing else: no system call entry or
 * exit, no sleep and no wake-up of the worker falls between the snapshots.
 *
 * WL_LEAK leaks blocks on purpose, for the suite to prove that kmemleak
 * reports a leak when there is one.
 *
 * WL_MISS calls a function that has a kprobe of this module on it, whose
 * handler calls kfree(NULL): a kfree hit inside a kprobe handler, which the
 * kprobe core does not run but counts as missed on the tracer's kfree probe.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/semaphore.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include "tracer_workload.h"

#define WL_PARK_TIMEOUT		(30 * HZ)
#define WL_MAX_BYTES		(1024 * 1024)

/* One open file of /dev/tracer_workload, shared by a worker and its driver. */
struct wl_session {
	struct mutex lock;		/* the mutex of WL_OP_MUTEX, only that */
	struct semaphore sem;		/* the semaphore of WL_OP_SEM, count 1 */
	wait_queue_head_t wq;		/* WL_WAIT callers, woken on a park */
	atomic_t phase;			/* WL_IDLE ... WL_FINISH */
	atomic_t running;		/* one WL_RUN at a time */
	void *ptrs[WL_MAX_COUNT];	/* the blocks of WL_OP_KMALLOC */
};

static atomic_t miss_handler_runs = ATOMIC_INIT(0);
static bool miss_probe_registered;

/* The target of the miss probe: keep it a real, out-of-line call. */
static noinline void wl_miss_target(void)
{
	barrier();
}

static int wl_miss_pre(struct kprobe *kp, struct pt_regs *regs)
{
	atomic_inc(&miss_handler_runs);
	kfree(NULL);
	return 0;
}

static struct kprobe miss_probe = {
	.pre_handler = wl_miss_pre,
};

/* Set the phase, then busy-wait (never sleeping) until it becomes until. */
static int wl_park(struct wl_session *s, int parked, int until)
{
	unsigned long deadline = jiffies + WL_PARK_TIMEOUT;

	atomic_set(&s->phase, parked);
	wake_up_all(&s->wq);
	while (atomic_read(&s->phase) != until) {
		if (fatal_signal_pending(current))
			return -EINTR;
		if (time_after(jiffies, deadline))
			return -ETIMEDOUT;
		cond_resched();
		cpu_relax();
	}
	return 0;
}

static int wl_kmalloc(struct wl_session *s, const struct wl_run *run)
{
	int err = 0;
	u32 i;

	for (i = 0; i < run->count; i++) {
		s->ptrs[i] = kmalloc(run->size + i * run->step, GFP_KERNEL);
		if (!s->ptrs[i]) {
			err = -ENOMEM;
			break;
		}
	}
	while (i--) {
		kfree(s->ptrs[i]);
		s->ptrs[i] = NULL;
	}
	return err;
}

/* count x kmalloc(size + i * step) into s->ptrs; all freed on failure. */
static int wl_alloc(struct wl_session *s, const struct wl_run *run)
{
	u32 i;

	for (i = 0; i < run->count; i++) {
		s->ptrs[i] = kmalloc(run->size + i * run->step, GFP_KERNEL);
		if (!s->ptrs[i]) {
			kfree_bulk(i, s->ptrs);
			return -ENOMEM;
		}
	}
	return 0;
}

static int wl_bulk(struct wl_session *s, const struct wl_run *run)
{
	int err = wl_alloc(s, run);

	if (!err)
		kfree_bulk(run->count, s->ptrs);
	memset(s->ptrs, 0, sizeof(s->ptrs));
	return err;
}

static int wl_kfree_rcu(struct wl_session *s, const struct wl_run *run)
{
	int err = wl_alloc(s, run);
	u32 i;

	for (i = 0; !err && i < run->count; i++)
		kvfree_rcu(s->ptrs[i]);
	memset(s->ptrs, 0, sizeof(s->ptrs));
	return err;
}

static int wl_work(struct wl_session *s, const struct wl_run *run)
{
	int err;
	u32 i;

	if (run->ops & WL_OP_KMALLOC) {
		err = wl_kmalloc(s, run);
		if (err)
			return err;
	}
	if (run->ops & WL_OP_BULK) {
		err = wl_bulk(s, run);
		if (err)
			return err;
	}
	if (run->ops & WL_OP_KFREE_RCU) {
		err = wl_kfree_rcu(s, run);
		if (err)
			return err;
	}
	if (run->ops & WL_OP_MUTEX) {
		for (i = 0; i < run->count; i++) {
			mutex_lock(&s->lock);
			mutex_unlock(&s->lock);
		}
	}
	if (run->ops & WL_OP_SEM) {
		for (i = 0; i < run->count; i++) {
			if (down_interruptible(&s->sem))
				return -EINTR;
			up(&s->sem);
		}
	}
	if (run->ops & WL_OP_SCHED) {
		for (i = 0; i < run->count; i++)
			schedule_timeout_interruptible(1);
	}
	return 0;
}

static long wl_run(struct wl_session *s, const struct wl_run __user *arg)
{
	struct wl_run run;
	u64 largest;
	int err;

	if (copy_from_user(&run, arg, sizeof(run)))
		return -EFAULT;
	largest = run.size + (u64)(run.count ? run.count - 1 : 0) * run.step;
	if (run.count > WL_MAX_COUNT || (run.ops & ~WL_OP_VALID) ||
	    (run.flags & ~WL_PARK) || !run.size || largest > WL_MAX_BYTES)
		return -EINVAL;
	if (atomic_cmpxchg(&s->running, 0, 1))
		return -EBUSY;
	err = 0;
	if (run.flags & WL_PARK)
		err = wl_park(s, WL_PARKED_BEFORE, WL_GO);
	if (!err)
		err = wl_work(s, &run);
	if (!err && (run.flags & WL_PARK))
		err = wl_park(s, WL_PARKED_AFTER, WL_FINISH);
	atomic_set(&s->phase, WL_IDLE);
	atomic_set(&s->running, 0);
	return err;
}

static long wl_wait(struct wl_session *s, unsigned long phase)
{
	long left;

	left = wait_event_interruptible_timeout(s->wq,
						atomic_read(&s->phase) == phase,
						WL_PARK_TIMEOUT);
	if (left < 0)
		return left;
	return left ? 0 : -ETIMEDOUT;
}

static long wl_release(struct wl_session *s)
{
	if (atomic_cmpxchg(&s->phase, WL_PARKED_BEFORE, WL_GO) ==
	    WL_PARKED_BEFORE)
		return 0;
	if (atomic_cmpxchg(&s->phase, WL_PARKED_AFTER, WL_FINISH) ==
	    WL_PARKED_AFTER)
		return 0;
	return -EINVAL;
}

static long wl_miss(unsigned long times)
{
	int before = atomic_read(&miss_handler_runs);
	unsigned long i;

	if (!miss_probe_registered)
		return -EOPNOTSUPP;
	if (times > WL_MAX_COUNT)
		return -EINVAL;
	for (i = 0; i < times; i++)
		wl_miss_target();
	return atomic_read(&miss_handler_runs) - before;
}

static noinline long wl_leak(unsigned long blocks)
{
	unsigned long i;

	if (blocks > WL_MAX_COUNT)
		return -EINVAL;
	for (i = 0; i < blocks; i++) {
		/* the pointer is dropped: this is the leak */
		if (!kmalloc(WL_LEAK_SIZE, GFP_KERNEL))
			return -ENOMEM;
	}
	return blocks;
}

static long wl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct wl_session *s = file->private_data;

	switch (cmd) {
	case WL_RUN:
		return wl_run(s, (const struct wl_run __user *)arg);
	case WL_WAIT:
		return wl_wait(s, arg);
	case WL_RELEASE:
		return wl_release(s);
	case WL_MISS:
		return wl_miss(arg);
	case WL_LEAK:
		return wl_leak(arg);
	default:
		return -ENOTTY;
	}
}

static int wl_open(struct inode *inode, struct file *file)
{
	struct wl_session *s = kvzalloc(sizeof(*s), GFP_KERNEL);

	if (!s)
		return -ENOMEM;
	mutex_init(&s->lock);
	sema_init(&s->sem, 1);
	init_waitqueue_head(&s->wq);
	file->private_data = s;
	return 0;
}

static int wl_close(struct inode *inode, struct file *file)
{
	kvfree(file->private_data);
	return 0;
}

static const struct file_operations wl_fops = {
	.owner = THIS_MODULE,
	.open = wl_open,
	.release = wl_close,
	.unlocked_ioctl = wl_ioctl,
};

static struct miscdevice wl_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = WL_DEV_NAME,
	.fops = &wl_fops,
};

static int __init wl_init(void)
{
	int err;

	miss_probe.addr = (kprobe_opcode_t *)wl_miss_target;
	err = register_kprobe(&miss_probe);
	if (err)
		pr_warn("no miss probe (%d): WL_MISS unsupported\n", err);
	else
		miss_probe_registered = true;
	err = misc_register(&wl_dev);
	if (err && miss_probe_registered)
		unregister_kprobe(&miss_probe);
	return err;
}

static void __exit wl_exit(void)
{
	misc_deregister(&wl_dev);
	if (miss_probe_registered)
		unregister_kprobe(&miss_probe);
}

module_init(wl_init);
module_exit(wl_exit);

MODULE_DESCRIPTION("exact workloads for the tracer module's tests");
MODULE_AUTHOR("kernel-ci");
MODULE_LICENSE("GPL");
