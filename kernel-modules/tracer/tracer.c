// SPDX-License-Identifier: GPL-2.0
/*
 * tracer - a kretprobe based kernel operations tracer.
 *
 * For every monitored process (added with ioctl(TRACER_ADD_PROCESS, pid) on
 * /dev/tracer) it counts the calls of __kmalloc, kfree, schedule, up,
 * down_interruptible, mutex_lock (or mutex_lock_nested, whichever the
 * running kernel has) and mutex_unlock made in that process's context, and
 * the bytes allocated by __kmalloc and released by kfree. /proc/tracer shows
 * one line per monitored process, /proc/tracer_stats the probes' misses.
 *
 * Probe handlers never sleep, never allocate and never call a probed
 * function: every record comes from pools preallocated at load time and all
 * shared state is under one irq-safe spinlock (see README.md).
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/hashtable.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pid.h>
#include <linux/preempt.h>
#include <linux/proc_fs.h>
#include <linux/ptrace.h>
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
	struct hlist_node node;		/* procs, by pid number; or the pool */
	struct list_head recs;		/* its live tracer_rec records */
	struct pid *pid;		/* a reference: the identity of the task */
	pid_t nr;			/* pid_nr(pid), the hash key */
	u64 count[NR_COLS];
};

/* An address returned by __kmalloc to a monitored process, and its size. */
struct tracer_rec {
	struct hlist_node node;		/* recs, by address; or the pool */
	struct list_head owner_link;	/* in owner->recs */
	struct tracer_proc *owner;
	unsigned long addr;
	size_t size;
};

/* tracer_lock protects everything below, up to the pools' counters. */
static DEFINE_SPINLOCK(tracer_lock);
static DEFINE_HASHTABLE(procs, TRACER_PROC_BITS);
static DEFINE_HASHTABLE(recs, TRACER_REC_BITS);
static HLIST_HEAD(free_procs);
static HLIST_HEAD(free_recs);
static unsigned int nr_procs;		/* read locklessly by the fast path */
static unsigned int nr_recs;
static u64 recs_dropped;		/* allocations not recorded: pool empty */
static u64 adds_refused;		/* TRACER_ADD_PROCESS with the pool empty */

static struct tracer_proc *proc_pool;
static struct tracer_rec *rec_pool;

/*
 * Was the probed code running in process context? A kprobe hit through int3
 * runs its handler inside irqentry_nmi_enter() on x86, which adds
 * NMI_OFFSET + HARDIRQ_OFFSET to the preempt count; an optimized (jump)
 * kprobe and the kretprobe trampoline do not. Remove that layer, then ask
 * what in_task() asks. (None of the probed functions may run in a real NMI.)
 */
static bool probed_in_task(void)
{
	unsigned long pc = preempt_count();

	if (pc & NMI_MASK)
		pc -= NMI_OFFSET + HARDIRQ_OFFSET;
	return !(pc & (NMI_MASK | HARDIRQ_MASK | SOFTIRQ_OFFSET));
}

static struct tracer_proc *proc_find(struct pid *pid)
{
	struct tracer_proc *p;
	pid_t nr = pid_nr(pid);

	hash_for_each_possible(procs, p, node, nr)
		if (p->pid == pid)
			return p;
	return NULL;
}

/* The entry of the current task, if monitored. Called under tracer_lock. */
static struct tracer_proc *proc_current(void)
{
	return proc_find(task_pid(current));
}

static struct tracer_rec *rec_find(unsigned long addr)
{
	struct tracer_rec *r;

	hash_for_each_possible(recs, r, node, addr)
		if (r->addr == addr)
			return r;
	return NULL;
}

static void rec_release(struct tracer_rec *r)
{
	hash_del(&r->node);
	list_del(&r->owner_link);
	hlist_add_head(&r->node, &free_recs);
	nr_recs--;
}

static void rec_record(struct tracer_proc *p, unsigned long addr, size_t size)
{
	struct tracer_rec *r = rec_find(addr);

	/* A record left for this address means its kfree was missed. */
	if (r) {
		list_move(&r->owner_link, &p->recs);
	} else if (!hlist_empty(&free_recs)) {
		r = hlist_entry(free_recs.first, struct tracer_rec, node);
		hlist_del(&r->node);
		r->addr = addr;
		hash_add(recs, &r->node, addr);
		list_add(&r->owner_link, &p->recs);
		nr_recs++;
	} else {
		recs_dropped++;
		return;
	}
	r->owner = p;
	r->size = size;
}

/*
 * Take a process out of the table with its records. Its pid reference is
 * dropped by procs_reap() once tracer_lock is released.
 */
static void proc_unlink(struct tracer_proc *p, struct hlist_head *dead)
{
	struct tracer_rec *r, *tmp;

	list_for_each_entry_safe(r, tmp, &p->recs, owner_link)
		rec_release(r);
	hash_del(&p->node);
	hlist_add_head(&p->node, dead);
	WRITE_ONCE(nr_procs, nr_procs - 1);
}

/* Drop the entries whose task has exited or is exiting. */
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

/* Put the pid references of unlinked entries and return them to the pool. */
static void procs_reap(struct hlist_head *dead)
{
	struct tracer_proc *p;
	struct hlist_node *tmp;
	unsigned long flags;

	if (hlist_empty(dead))
		return;
	hlist_for_each_entry(p, dead, node) {
		put_pid(p->pid);
		p->pid = NULL;
	}
	spin_lock_irqsave(&tracer_lock, flags);
	hlist_for_each_entry_safe(p, tmp, dead, node) {
		hlist_del(&p->node);
		hlist_add_head(&p->node, &free_procs);
	}
	spin_unlock_irqrestore(&tracer_lock, flags);
}

/* ---- probe handlers: atomic context, any CPU ---- */

static void count_current(enum tracer_col col)
{
	struct tracer_proc *p;
	unsigned long flags;

	if (!READ_ONCE(nr_procs) || !probed_in_task())
		return;
	spin_lock_irqsave(&tracer_lock, flags);
	p = proc_current();
	if (p)
		p->count[col]++;
	spin_unlock_irqrestore(&tracer_lock, flags);
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
	struct tracer_proc *p;
	unsigned long flags;

	if (!READ_ONCE(nr_procs) || !probed_in_task())
		return 1;
	spin_lock_irqsave(&tracer_lock, flags);
	p = proc_current();
	if (p)
		p->count[COL_KMALLOC]++;
	spin_unlock_irqrestore(&tracer_lock, flags);
	if (!p)
		return 1;
	data->size = regs_get_kernel_argument(regs, 0);
	return 0;
}

/* The address __kmalloc returned: remember its size for kfree. */
static int kmalloc_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct kmalloc_data *data = (struct kmalloc_data *)ri->data;
	unsigned long addr = regs_return_value(regs);
	struct tracer_proc *p;
	unsigned long flags;

	if (ZERO_OR_NULL_PTR((void *)addr))
		return 0;
	spin_lock_irqsave(&tracer_lock, flags);
	p = proc_current();	/* it may have been removed meanwhile */
	if (p) {
		p->count[COL_KMALLOC_MEM] += data->size;
		rec_record(p, addr, data->size);
	}
	spin_unlock_irqrestore(&tracer_lock, flags);
	return 0;
}

/*
 * kfree(addr): count the call for a monitored caller and, when the address
 * has a record, add its size. The record goes whoever frees the block (an
 * unmonitored task, an interrupt): the address is no longer allocated.
 */
static int kfree_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	unsigned long addr = regs_get_kernel_argument(regs, 0);
	struct tracer_proc *p = NULL;
	struct tracer_rec *r = NULL;
	unsigned long flags;

	if (!READ_ONCE(nr_procs))
		return 1;
	spin_lock_irqsave(&tracer_lock, flags);
	if (!ZERO_OR_NULL_PTR((void *)addr))
		r = rec_find(addr);
	if (probed_in_task())
		p = proc_current();
	if (p) {
		p->count[COL_KFREE]++;
		if (r)
			p->count[COL_KFREE_MEM] += r->size;
	}
	if (r)
		rec_release(r);
	spin_unlock_irqrestore(&tracer_lock, flags);
	return 1;
}

/* do_exit(): the current task is exiting; drop it from the table. */
static int exit_pre(struct kprobe *kp, struct pt_regs *regs)
{
	struct tracer_proc *p;
	unsigned long flags;
	HLIST_HEAD(dead);

	if (!READ_ONCE(nr_procs))
		return 0;
	spin_lock_irqsave(&tracer_lock, flags);
	p = proc_current();
	if (p)
		proc_unlink(p, &dead);
	spin_unlock_irqrestore(&tracer_lock, flags);
	/* The exiting task still holds its own pid: this put is never the last. */
	procs_reap(&dead);
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

static struct kprobe exit_probe = {
	.symbol_name = "do_exit",
	.pre_handler = exit_pre,
};

static bool exit_probe_registered;

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

	if (exit_probe_registered) {
		unregister_kprobe(&exit_probe);
		exit_probe_registered = false;
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
	err = register_kprobe(&exit_probe);
	if (err) {
		pr_err("cannot probe do_exit: %d\n", err);
		goto fail;
	}
	exit_probe_registered = true;
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
	spin_lock_irqsave(&tracer_lock, flags);
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
		hash_add(procs, &p->node, p->nr);
		WRITE_ONCE(nr_procs, nr_procs + 1);
	}
	spin_unlock_irqrestore(&tracer_lock, flags);
	procs_reap(&dead);
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
	spin_lock_irqsave(&tracer_lock, flags);
	procs_purge(&dead);
	p = proc_find(pid);
	if (p)
		proc_unlink(p, &dead);
	else
		err = -ENOENT;
	spin_unlock_irqrestore(&tracer_lock, flags);
	procs_reap(&dead);
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
	.compat_ioctl = compat_ptr_ioctl,
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
	spin_lock_irqsave(&tracer_lock, flags);
	procs_purge(&dead);
	hash_for_each(procs, bkt, p, node)
		seq_printf(m, "%-7d %-8llu %-8llu %-12llu %-12llu %-8llu %-8llu %-8llu %-8llu %llu\n",
			   p->nr, p->count[COL_KMALLOC], p->count[COL_KFREE],
			   p->count[COL_KMALLOC_MEM], p->count[COL_KFREE_MEM],
			   p->count[COL_SCHED], p->count[COL_UP],
			   p->count[COL_DOWN], p->count[COL_LOCK],
			   p->count[COL_UNLOCK]);
	spin_unlock_irqrestore(&tracer_lock, flags);
	procs_reap(&dead);
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
	seq_printf(m, "%-20s %-10s %lu\n", exit_probe.symbol_name, "-",
		   READ_ONCE(exit_probe.nmissed));
	spin_lock_irqsave(&tracer_lock, flags);
	procs_used = nr_procs;
	recs_used = nr_recs;
	dropped = recs_dropped;
	refused = adds_refused;
	spin_unlock_irqrestore(&tracer_lock, flags);
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
	for (i = 0; i < max_procs; i++)
		hlist_add_head(&proc_pool[i].node, &free_procs);
	for (i = 0; i < max_records; i++)
		hlist_add_head(&rec_pool[i].node, &free_recs);
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

	spin_lock_irqsave(&tracer_lock, flags);
	hash_for_each_safe(procs, bkt, tmp, p, node)
		proc_unlink(p, &dead);
	spin_unlock_irqrestore(&tracer_lock, flags);
	procs_reap(&dead);
	WARN_ON(nr_recs || nr_procs);
	kvfree(proc_pool);
	kvfree(rec_pool);
}

static int __init tracer_init(void)
{
	int err;

	err = pools_alloc();
	if (err)
		return err;
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
	err = probes_register();
	if (err)
		goto out_misc;
	pr_info("loaded\n");
	return 0;

out_misc:
	misc_deregister(&tracer_dev);
out_proc:
	proc_remove(proc_stats);
	proc_remove(proc_tracer);
	tables_free();
	return err;
}

static void __exit tracer_exit(void)
{
	/* No handler runs after this: unregister waits for running ones. */
	probes_unregister();
	misc_deregister(&tracer_dev);
	proc_remove(proc_stats);
	proc_remove(proc_tracer);
	tables_free();
	pr_info("unloaded\n");
}

module_init(tracer_init);
module_exit(tracer_exit);

MODULE_DESCRIPTION("kretprobe based kernel operations tracer");
MODULE_AUTHOR("kernel-ci");
MODULE_LICENSE("GPL");
