// SPDX-License-Identifier: GPL-2.0
/*
 * tracer - a kretprobe based kernel operations tracer.
 *
 * For every monitored process (added with ioctl(TRACER_ADD_PROCESS, pid) on
 * /dev/tracer) it counts the calls of __kmalloc, kfree, schedule, up,
 * down_interruptible, mutex_lock (or mutex_lock_nested, whichever the
 * running kernel has) and mutex_unlock made in that process's context, and
 * the bytes allocated by __kmalloc and released by kfree (or by
 * kmem_cache_free_bulk(), which kfree_bulk() and kfree_rcu() use). /proc/tracer
 * shows one line per monitored process, /proc/tracer_stats the probes' misses.
 *
 * Probe handlers never sleep, never allocate and never call a probed
 * function: every record comes from pools preallocated at load time. The
 * entry handlers, which run from int3 (an NMI for lockdep on 5.10) on any
 * CPU, take no lock at all: they look the tables up under RCU and drop a
 * record with one cmpxchg. Only the __kmalloc return handler, which runs
 * from the kretprobe trampoline in the caller's context, and the control
 * paths take tracer_lock (see README.md).
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/bits.h>
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/hash.h>
#include <linux/hashtable.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/list.h>
#include <linux/list_nulls.h>
#include <linux/llist.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pid.h>
#include <linux/preempt.h>
#include <linux/proc_fs.h>
#include <linux/ptrace.h>
#include <linux/rculist.h>
#include <linux/rculist_nulls.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/types.h>

#include "tracer.h"

#define TRACER_PROC_NAME	"tracer"
#define TRACER_STATS_NAME	"tracer_stats"
#define TRACER_PROC_BITS	8
#define TRACER_REC_BITS		12
#define TRACER_REC_BUCKETS	BIT(TRACER_REC_BITS)
/* The nulls value ending the free list: no bucket has it. */
#define TRACER_REC_FREE_NULLS	TRACER_REC_BUCKETS

static unsigned int max_procs = 256;
module_param(max_procs, uint, 0444);
MODULE_PARM_DESC(max_procs, "Most processes monitored at once (preallocated)");

static unsigned int max_records = 16384;
module_param(max_records, uint, 0444);
MODULE_PARM_DESC(max_records,
		 "Most live __kmalloc address->size records (preallocated)");

static int kmalloc_maxactive;
module_param(kmalloc_maxactive, int, 0444);
MODULE_PARM_DESC(kmalloc_maxactive,
		 "__kmalloc calls of monitored processes in flight at once (0: 64 + 4 per CPU)");

/* The columns of /proc/tracer after PID, in order. */
enum tracer_col {
	COL_KMALLOC,
	COL_KFREE,
	COL_KMALLOC_MEM,
	COL_KFREE_MEM,
	COL_SCHED,
	COL_UP,
	COL_DOWN,
	COL_LOCK,
	COL_UNLOCK,
	NR_COLS,
};

/* A monitored process. */
struct tracer_proc {
	struct hlist_node node;		/* procs (RCU), by pid number; or a list */
	struct list_head recs;		/* its live records, under tracer_lock */
	struct pid *pid;		/* a reference: the identity of the task */
	pid_t nr;			/* pid_nr(pid), the hash key */
	/*
	 * Written only by handlers running in the task's own context, which
	 * never run concurrently (a kprobe hit inside a handler is skipped):
	 * one writer, no lock; readers use READ_ONCE().
	 */
	u64 count[NR_COLS];
};

/* An address returned by __kmalloc to a monitored process, and its size. */
struct tracer_rec {
	struct hlist_nulls_node node;	/* recs (RCU), by address; or free_recs */
	struct list_head owner_link;	/* in the owner's recs, under tracer_lock */
	struct llist_node dead_link;	/* in dead_recs once its block is freed */
	unsigned long addr;		/* 0 once freed: cleared by cmpxchg */
	size_t size;
};

/*
 * tracer_lock serializes the writers of the tables (the __kmalloc return
 * handler, the ioctls, the /proc reads, unload) and protects the free
 * lists, the owners' record lists and the counters below. Readers of the
 * tables (every entry handler) use RCU and take no lock. It is a raw
 * spinlock because a kretprobe handler runs with interrupts off and must not
 * sleep, PREEMPT_RT or not.
 */
static DEFINE_RAW_SPINLOCK(tracer_lock);
static DEFINE_HASHTABLE(procs, TRACER_PROC_BITS);
static struct hlist_nulls_head recs[TRACER_REC_BUCKETS];
static HLIST_HEAD(free_procs);
static struct hlist_nulls_head free_recs;
static LLIST_HEAD(dead_recs);		/* freed blocks' records, to unhash */
static unsigned int nr_procs;		/* read locklessly by the fast path */
static unsigned int nr_recs;		/* hashed records; read locklessly too */
static u64 recs_dropped;		/* allocations not recorded: pool empty */
static u64 adds_refused;		/* TRACER_ADD_PROCESS with the pool empty */

static struct tracer_proc *proc_pool;
static struct tracer_rec *rec_pool;

/*
 * Was the probed code running in process context? A kprobe hit through int3
 * runs its handler inside irqentry_nmi_enter() on x86, which adds
 * NMI_OFFSET + HARDIRQ_OFFSET to the preempt count; an optimized (jump) or
 * ftrace-based kprobe and the kretprobe trampoline do not. Remove that
 * layer, then ask what in_task() asks. (None of the probed functions may run
 * in a real NMI.)
 */
static bool probed_in_task(void)
{
	unsigned long pc = preempt_count();

	if (pc & NMI_MASK)
		pc -= NMI_OFFSET + HARDIRQ_OFFSET;
	return !(pc & (NMI_MASK | HARDIRQ_MASK | SOFTIRQ_OFFSET));
}

/*
 * The entry of pid. Under tracer_lock, or lockless from a handler: handlers
 * run with preemption off, an RCU read side, and an entry unlinked from procs
 * goes back to its pool only after synchronize_rcu() (procs_release()).
 */
static struct tracer_proc *proc_find(struct pid *pid)
{
	struct tracer_proc *p;

	hash_for_each_possible_rcu(procs, p, node, pid_nr(pid))
		if (READ_ONCE(p->pid) == pid)
			return p;
	return NULL;
}

/* The entry of the current task if it is monitored and in process context. */
static struct tracer_proc *proc_current(void)
{
	if (!READ_ONCE(nr_procs) || !probed_in_task())
		return NULL;
	return proc_find(task_pid(current));
}

/* Only the task itself, in a handler, adds to its counts: see tracer_proc. */
static void count_add(struct tracer_proc *p, enum tracer_col col, u64 n)
{
	WRITE_ONCE(p->count[col], p->count[col] + n);
}

static unsigned int rec_bucket(unsigned long addr)
{
	return hash_long(addr, TRACER_REC_BITS);
}

/*
 * The live record of addr, lockless. Records are reused without waiting for
 * a grace period, so a walk may be carried into another chain (or the free
 * list) by a record that moved: each chain ends in its own nulls value, and a
 * walk that ended in another one starts again.
 */
static struct tracer_rec *rec_find(unsigned long addr)
{
	unsigned int bkt = rec_bucket(addr);
	struct hlist_nulls_node *pos;
	struct tracer_rec *r;

begin:
	hlist_nulls_for_each_entry_rcu(r, pos, &recs[bkt], node)
		if (READ_ONCE(r->addr) == addr)
			return r;
	if (get_nulls_value(pos) != bkt)
		goto begin;
	return NULL;
}

/*
 * The block at addr is being freed: drop its record, if any, and return its
 * size (0 without one). Lockless, for any context: the cmpxchg decides who
 * drops a record (a concurrent proc_unlink() may too); the winner queues it
 * for recs_reap(). An address cannot be recorded again before this returns:
 * it is still allocated.
 */
static size_t rec_forget(unsigned long addr)
{
	struct tracer_rec *r = rec_find(addr);
	size_t size;

	if (!r || cmpxchg(&r->addr, addr, 0) != addr)
		return 0;
	size = READ_ONCE(r->size);
	llist_add(&r->dead_link, &dead_recs);
	return size;
}

/* Return a record to the pool. Under tracer_lock. */
static void rec_free(struct tracer_rec *r)
{
	hlist_nulls_del_rcu(&r->node);
	list_del_init(&r->owner_link);
	hlist_nulls_add_head_rcu(&r->node, &free_recs);
	nr_recs--;
}

/* Return the records of freed blocks to the pool. Under tracer_lock. */
static void recs_reap(void)
{
	struct llist_node *dead = llist_del_all(&dead_recs);

	while (dead) {
		struct tracer_rec *r = llist_entry(dead, struct tracer_rec,
						   dead_link);

		dead = dead->next;
		rec_free(r);
	}
}

/* Remember addr -> size for p. Under tracer_lock. */
static void rec_record(struct tracer_proc *p, unsigned long addr, size_t size)
{
	struct tracer_rec *r;

	recs_reap();
	r = rec_find(addr);
	/* A record left for this address means its free was missed. */
	if (r) {
		list_move(&r->owner_link, &p->recs);
		WRITE_ONCE(r->size, size);
		return;
	}
	if (is_a_nulls(free_recs.first)) {
		recs_dropped++;
		return;
	}
	r = hlist_nulls_entry(free_recs.first, struct tracer_rec, node);
	hlist_nulls_del_rcu(&r->node);
	WRITE_ONCE(r->size, size);
	WRITE_ONCE(r->addr, addr);
	list_add(&r->owner_link, &p->recs);
	hlist_nulls_add_head_rcu(&r->node, &recs[rec_bucket(addr)]);
	nr_recs++;
}

/*
 * Take a process out of the table with its records; it joins dead, which
 * procs_release() returns to the pool once tracer_lock is released. Under
 * tracer_lock.
 */
static void proc_unlink(struct tracer_proc *p, struct hlist_head *dead)
{
	struct tracer_rec *r, *tmp;

	list_for_each_entry_safe(r, tmp, &p->recs, owner_link) {
		unsigned long addr = READ_ONCE(r->addr);

		if (addr && cmpxchg(&r->addr, addr, 0) == addr)
			rec_free(r);
		else	/* freed meanwhile: queued for recs_reap() */
			list_del_init(&r->owner_link);
	}
	hash_del_rcu(&p->node);
	hlist_add_head(&p->node, dead);
	WRITE_ONCE(nr_procs, nr_procs - 1);
}

/*
 * Drop the entries whose task has exited or is exiting. Under tracer_lock.
 * Nothing probes do_exit(): an exited process is dropped by the next add,
 * remove or read of /proc/tracer.
 */
static void procs_purge(struct hlist_head *dead)
{
	struct tracer_proc *p;
	struct hlist_node *tmp;
	int bkt;

	rcu_read_lock();
	hash_for_each_safe(procs, bkt, tmp, p, node) {
		struct task_struct *task = pid_task(p->pid, PIDTYPE_PID);

		if (!task || (task->flags & PF_EXITING))
			proc_unlink(p, dead);
	}
	rcu_read_unlock();
}

/*
 * Return unlinked entries to the pool: once no handler can still see them
 * (a grace period), put their pid references. Process context, no lock held.
 */
static void procs_release(struct hlist_head *dead)
{
	struct tracer_proc *p;
	struct hlist_node *tmp;
	unsigned long flags;

	if (hlist_empty(dead))
		return;
	synchronize_rcu();
	hlist_for_each_entry(p, dead, node) {
		put_pid(p->pid);
		p->pid = NULL;
	}
	raw_spin_lock_irqsave(&tracer_lock, flags);
	hlist_for_each_entry_safe(p, tmp, dead, node) {
		hlist_del(&p->node);
		hlist_add_head(&p->node, &free_procs);
	}
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
}

/* ---- probe handlers: atomic context, any CPU ---- */

static void count_current(enum tracer_col col)
{
	struct tracer_proc *p = proc_current();

	if (p)
		count_add(p, col, 1);
}

/*
 * Counting-only probes return non-zero from the entry handler: the kretprobe
 * instance goes straight back to the free list, so no instance is held while
 * the probed function runs (or, for schedule, sleeps).
 */
static int sched_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	count_current(COL_SCHED);
	return 1;
}

static int up_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	count_current(COL_UP);
	return 1;
}

static int down_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	count_current(COL_DOWN);
	return 1;
}

static int lock_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	count_current(COL_LOCK);
	return 1;
}

static int unlock_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	count_current(COL_UNLOCK);
	return 1;
}

struct kmalloc_data {
	size_t size;
};

/* __kmalloc(size, flags): count the call, keep the size for the return. */
static int kmalloc_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct kmalloc_data *data = (struct kmalloc_data *)ri->data;
	struct tracer_proc *p = proc_current();

	if (!p)
		return 1;
	count_add(p, COL_KMALLOC, 1);
	data->size = regs_get_kernel_argument(regs, 0);
	return 0;
}

/*
 * The address __kmalloc returned: remember its size for the free. This runs
 * from the kretprobe trampoline in the caller's (process) context, never
 * from int3, so it may take tracer_lock.
 */
static int kmalloc_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct kmalloc_data *data = (struct kmalloc_data *)ri->data;
	unsigned long addr = regs_return_value(regs);
	struct tracer_proc *p;
	unsigned long flags;

	if (ZERO_OR_NULL_PTR((void *)addr))
		return 0;
	raw_spin_lock_irqsave(&tracer_lock, flags);
	p = proc_current();	/* it may have been removed meanwhile */
	if (p) {
		count_add(p, COL_KMALLOC_MEM, data->size);
		rec_record(p, addr, data->size);
	}
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
	return 0;
}

/*
 * kfree(addr): count the call for a monitored caller and, when the address
 * has a record, add its size. The record goes whoever frees the block (an
 * unmonitored task, an interrupt): the address is no longer allocated.
 * Lockless: nothing but a hash lookup for a block nobody monitored allocated.
 */
static int kfree_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	unsigned long addr = regs_get_kernel_argument(regs, 0);
	struct tracer_proc *p;
	size_t size = 0;

	if (READ_ONCE(nr_recs) && !ZERO_OR_NULL_PTR((void *)addr))
		size = rec_forget(addr);
	p = proc_current();
	if (p) {
		count_add(p, COL_KFREE, 1);
		count_add(p, COL_KFREE_MEM, size);
	}
	return 1;
}

/*
 * kmem_cache_free_bulk(s, n, objs): kfree_bulk() is kmem_cache_free_bulk(NULL,
 * ...) and frees kmalloc blocks without calling kfree(); kfree_rcu() frees
 * its batches with it. Drop the records of the blocks and charge their bytes
 * to a monitored caller's kfree_mem (not to its kfree calls: it made none).
 */
static int free_bulk_pre(struct kprobe *kp, struct pt_regs *regs)
{
	size_t n = regs_get_kernel_argument(regs, 1);
	void **objs = (void **)regs_get_kernel_argument(regs, 2);
	struct tracer_proc *p;
	u64 bytes = 0;
	size_t i;

	if (!READ_ONCE(nr_recs))
		return 0;
	for (i = 0; i < n; i++) {
		unsigned long addr = (unsigned long)READ_ONCE(objs[i]);

		if (!ZERO_OR_NULL_PTR((void *)addr))
			bytes += rec_forget(addr);
	}
	p = proc_current();
	if (p)
		count_add(p, COL_KFREE_MEM, bytes);
	return 0;
}

/* ---- probes ---- */

struct tracer_probe {
	const char *symbols[2];		/* the first one the kernel has */
	kretprobe_handler_t entry;
	kretprobe_handler_t ret;
	size_t data_size;
	bool maxactive_param;		/* sized by kmalloc_maxactive */
	bool registered;
	struct kretprobe rp;
};

static struct tracer_probe probes[] = {
	{ .symbols = { "__kmalloc" }, .entry = kmalloc_entry,
	  .ret = kmalloc_ret, .data_size = sizeof(struct kmalloc_data),
	  .maxactive_param = true },
	{ .symbols = { "kfree" }, .entry = kfree_entry },
	{ .symbols = { "schedule" }, .entry = sched_entry },
	{ .symbols = { "up" }, .entry = up_entry },
	{ .symbols = { "down_interruptible" }, .entry = down_entry },
	/* With CONFIG_DEBUG_LOCK_ALLOC, mutex_lock() is mutex_lock_nested(). */
	{ .symbols = { "mutex_lock", "mutex_lock_nested" }, .entry = lock_entry },
	{ .symbols = { "mutex_unlock" }, .entry = unlock_entry },
};

static struct kprobe bulk_probe = {
	.symbol_name = "kmem_cache_free_bulk",
	.pre_handler = free_bulk_pre,
};

static bool bulk_probe_registered;

static int probe_register(struct tracer_probe *tp)
{
	int i, err = -ENOENT;

	for (i = 0; i < ARRAY_SIZE(tp->symbols) && tp->symbols[i]; i++) {
		memset(&tp->rp, 0, sizeof(tp->rp));
		tp->rp.kp.symbol_name = tp->symbols[i];
		tp->rp.entry_handler = tp->entry;
		tp->rp.handler = tp->ret;
		tp->rp.data_size = tp->data_size;
		/*
		 * Counting-only probes hold an instance only inside their
		 * entry handler, which does not nest on a CPU.
		 */
		if (tp->maxactive_param)
			tp->rp.maxactive = kmalloc_maxactive > 0 ?
				kmalloc_maxactive : 64 + 4 * num_possible_cpus();
		else
			tp->rp.maxactive = 8 + 2 * num_possible_cpus();
		err = register_kretprobe(&tp->rp);
		if (!err) {
			tp->registered = true;
			pr_info("probing %s (maxactive %d)\n",
				tp->symbols[i], tp->rp.maxactive);
			return 0;
		}
		if (err != -ENOENT)
			break;
	}
	pr_err("cannot probe %s: %d\n", tp->symbols[0], err);
	return err;
}

static void probes_unregister(void)
{
	struct kretprobe *rps[ARRAY_SIZE(probes)];
	int i, n = 0;

	if (bulk_probe_registered) {
		unregister_kprobe(&bulk_probe);
		bulk_probe_registered = false;
	}
	for (i = 0; i < ARRAY_SIZE(probes); i++)
		if (probes[i].registered)
			rps[n++] = &probes[i].rp;
	/* One batch: a single RCU grace period for all of them. */
	if (n)
		unregister_kretprobes(rps, n);
	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		if (!probes[i].registered)
			continue;
		probes[i].registered = false;
		pr_info("%s: nmissed %lu\n", probes[i].rp.kp.symbol_name,
			(unsigned long)probes[i].rp.nmissed +
			probes[i].rp.kp.nmissed);
	}
}

static int probes_register(void)
{
	int i, err;

	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		err = probe_register(&probes[i]);
		if (err)
			goto fail;
	}
	err = register_kprobe(&bulk_probe);
	if (err) {
		pr_err("cannot probe %s: %d\n", bulk_probe.symbol_name, err);
		goto fail;
	}
	bulk_probe_registered = true;
	return 0;
fail:
	probes_unregister();
	return err;
}

/* ---- control: /dev/tracer ---- */

static int tracer_add(pid_t nr)
{
	struct tracer_proc *p = NULL;
	struct task_struct *task;
	unsigned long flags;
	struct pid *pid;
	HLIST_HEAD(dead);
	int err = 0;

	if (nr <= 0)
		return -EINVAL;
	pid = find_get_pid(nr);
	if (!pid)
		return -ESRCH;
	raw_spin_lock_irqsave(&tracer_lock, flags);
	procs_purge(&dead);
	rcu_read_lock();
	task = pid_task(pid, PIDTYPE_PID);
	if (!task || (task->flags & PF_EXITING))
		err = -ESRCH;
	rcu_read_unlock();
	if (!err && proc_find(pid)) {
		err = -EEXIST;
	} else if (!err && hlist_empty(&free_procs)) {
		adds_refused++;
		err = -ENOSPC;
	} else if (!err) {
		p = hlist_entry(free_procs.first, struct tracer_proc, node);
		hlist_del(&p->node);
		memset(p->count, 0, sizeof(p->count));
		INIT_LIST_HEAD(&p->recs);
		p->pid = pid;
		p->nr = pid_nr(pid);
		hash_add_rcu(procs, &p->node, p->nr);
		WRITE_ONCE(nr_procs, nr_procs + 1);
	}
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
	procs_release(&dead);
	if (err)
		put_pid(pid);
	return err;
}

static int tracer_remove(pid_t nr)
{
	struct tracer_proc *p;
	unsigned long flags;
	struct pid *pid;
	HLIST_HEAD(dead);
	int err = 0;

	if (nr <= 0)
		return -EINVAL;
	pid = find_get_pid(nr);
	if (!pid)
		return -ENOENT;	/* gone: it was dropped from the table */
	raw_spin_lock_irqsave(&tracer_lock, flags);
	procs_purge(&dead);
	p = proc_find(pid);
	if (p)
		proc_unlink(p, &dead);
	else
		err = -ENOENT;
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
	procs_release(&dead);
	put_pid(pid);
	return err;
}

static long tracer_ioctl(struct file *file, unsigned int cmd,
			 unsigned long arg)
{
	switch (cmd) {
	case TRACER_ADD_PROCESS:
		return tracer_add((pid_t)arg);
	case TRACER_REMOVE_PROCESS:
		return tracer_remove((pid_t)arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations tracer_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = tracer_ioctl,
	/*
	 * The argument is the pid itself, not a pointer, and the command
	 * numbers are the same for 32-bit callers (pid_t is 32 bits on both):
	 * the native handler takes the value as it is. compat_ptr_ioctl would
	 * pass it through compat_ptr(), which is for pointers.
	 */
	.compat_ioctl = tracer_ioctl,
};

static struct miscdevice tracer_dev = {
	.minor = TRACER_DEV_MINOR,
	.name = TRACER_DEV_NAME,
	.fops = &tracer_fops,
};

/* ---- report: /proc/tracer, /proc/tracer_stats ---- */

static int tracer_show(struct seq_file *m, void *v)
{
	struct tracer_proc *p;
	unsigned long flags;
	HLIST_HEAD(dead);
	int bkt;

	seq_printf(m, "%-7s %-8s %-8s %-12s %-12s %-8s %-8s %-8s %-8s %s\n",
		   "PID", "kmalloc", "kfree", "kmalloc_mem", "kfree_mem",
		   "sched", "up", "down", "lock", "unlock");
	raw_spin_lock_irqsave(&tracer_lock, flags);
	recs_reap();
	procs_purge(&dead);
	hash_for_each(procs, bkt, p, node)
		seq_printf(m, "%-7d %-8llu %-8llu %-12llu %-12llu %-8llu %-8llu %-8llu %-8llu %llu\n",
			   p->nr, READ_ONCE(p->count[COL_KMALLOC]),
			   READ_ONCE(p->count[COL_KFREE]),
			   READ_ONCE(p->count[COL_KMALLOC_MEM]),
			   READ_ONCE(p->count[COL_KFREE_MEM]),
			   READ_ONCE(p->count[COL_SCHED]),
			   READ_ONCE(p->count[COL_UP]),
			   READ_ONCE(p->count[COL_DOWN]),
			   READ_ONCE(p->count[COL_LOCK]),
			   READ_ONCE(p->count[COL_UNLOCK]));
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
	procs_release(&dead);
	return 0;
}

static int tracer_stats_show(struct seq_file *m, void *v)
{
	unsigned int procs_used, recs_used;
	u64 dropped, refused;
	unsigned long flags;
	int i;

	seq_printf(m, "%-20s %-10s %s\n", "probe", "maxactive", "nmissed");
	for (i = 0; i < ARRAY_SIZE(probes); i++) {
		struct kretprobe *rp = &probes[i].rp;

		/* nmissed: no free instance; kp.nmissed: hit inside a probe */
		seq_printf(m, "%-20s %-10d %lu\n", rp->kp.symbol_name,
			   rp->maxactive,
			   (unsigned long)READ_ONCE(rp->nmissed) +
			   READ_ONCE(rp->kp.nmissed));
	}
	seq_printf(m, "%-20s %-10s %lu\n", bulk_probe.symbol_name, "-",
		   READ_ONCE(bulk_probe.nmissed));
	raw_spin_lock_irqsave(&tracer_lock, flags);
	recs_reap();
	procs_used = nr_procs;
	recs_used = nr_recs;
	dropped = recs_dropped;
	refused = adds_refused;
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
	seq_printf(m, "processes %u/%u refused %llu\n", procs_used, max_procs,
		   refused);
	seq_printf(m, "records %u/%u dropped %llu\n", recs_used, max_records,
		   dropped);
	return 0;
}

static int tracer_open(struct inode *inode, struct file *file)
{
	return single_open(file, tracer_show, NULL);
}

static int tracer_stats_open(struct inode *inode, struct file *file)
{
	return single_open(file, tracer_stats_show, NULL);
}

static const struct proc_ops tracer_proc_ops = {
	.proc_open = tracer_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
};

static const struct proc_ops tracer_stats_proc_ops = {
	.proc_open = tracer_stats_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
};

static struct proc_dir_entry *proc_tracer, *proc_stats;

/* ---- load, unload ---- */

static int pools_alloc(void)
{
	unsigned int i;

	if (!max_procs || !max_records)
		return -EINVAL;
	proc_pool = kvcalloc(max_procs, sizeof(*proc_pool), GFP_KERNEL);
	rec_pool = kvcalloc(max_records, sizeof(*rec_pool), GFP_KERNEL);
	if (!proc_pool || !rec_pool) {
		kvfree(proc_pool);
		kvfree(rec_pool);
		return -ENOMEM;
	}
	for (i = 0; i < TRACER_REC_BUCKETS; i++)
		INIT_HLIST_NULLS_HEAD(&recs[i], i);
	INIT_HLIST_NULLS_HEAD(&free_recs, TRACER_REC_FREE_NULLS);
	for (i = 0; i < max_procs; i++)
		hlist_add_head(&proc_pool[i].node, &free_procs);
	for (i = 0; i < max_records; i++) {
		INIT_LIST_HEAD(&rec_pool[i].owner_link);
		hlist_nulls_add_head(&rec_pool[i].node, &free_recs);
	}
	return 0;
}

/* Unload: the probes are gone, nothing else can reach the tables. */
static void tables_free(void)
{
	struct tracer_proc *p;
	struct hlist_node *tmp;
	unsigned long flags;
	HLIST_HEAD(dead);
	int bkt;

	raw_spin_lock_irqsave(&tracer_lock, flags);
	recs_reap();
	hash_for_each_safe(procs, bkt, tmp, p, node)
		proc_unlink(p, &dead);
	raw_spin_unlock_irqrestore(&tracer_lock, flags);
	procs_release(&dead);
	WARN_ON(nr_recs || nr_procs);
	kvfree(proc_pool);
	kvfree(rec_pool);
	proc_pool = NULL;
	rec_pool = NULL;
	INIT_HLIST_HEAD(&free_procs);
}

static void tracer_files_remove(void)
{
	proc_remove(proc_stats);
	proc_remove(proc_tracer);
}

/*
 * The device and the /proc files come last: nothing can reach the tables
 * before the probes that keep them right are in place.
 */
static int __init tracer_init(void)
{
	int err;

	err = pools_alloc();
	if (err)
		return err;
	err = probes_register();
	if (err)
		goto out_tables;
	proc_tracer = proc_create(TRACER_PROC_NAME, 0444, NULL,
				  &tracer_proc_ops);
	proc_stats = proc_create(TRACER_STATS_NAME, 0444, NULL,
				 &tracer_stats_proc_ops);
	if (!proc_tracer || !proc_stats) {
		err = -ENOMEM;
		goto out_proc;
	}
	err = misc_register(&tracer_dev);
	if (err) {
		pr_err("cannot register /dev/%s (minor %d): %d\n",
		       TRACER_DEV_NAME, TRACER_DEV_MINOR, err);
		goto out_proc;
	}
	pr_info("loaded\n");
	return 0;

out_proc:
	tracer_files_remove();
	probes_unregister();
out_tables:
	tables_free();
	return err;
}

/* The reverse of tracer_init(). */
static void __exit tracer_exit(void)
{
	/* No ioctl or read after this: misc_deregister, proc_remove wait. */
	misc_deregister(&tracer_dev);
	tracer_files_remove();
	/* No handler runs after this: unregister waits for running ones. */
	probes_unregister();
	tables_free();
	pr_info("unloaded\n");
}

module_init(tracer_init);
module_exit(tracer_exit);

MODULE_DESCRIPTION("kretprobe based kernel operations tracer");
MODULE_AUTHOR("kernel-ci");
MODULE_LICENSE("GPL");
