// SPDX-License-Identifier: GPL-2.0
/*
 * kci_panic - a deliberately faulting module for the kernel-ci fault tests.
 *
 * Everything happens in the module's init function, i.e. in the context of
 * the insmod that loads it, so the fault is on the console before insmod
 * returns. The "mode" parameter picks the fault:
 *
 *   oops    (default) NULL pointer dereference; insmod is killed and the
 *           module stays in the "coming" state (it cannot be removed)
 *   bug     BUG(): "kernel BUG at ...", same aftermath as oops
 *   warn    WARN_ON(1): a warning with a stack trace; the load succeeds
 *   panic   panic("kci-panic: requested"); with panic=-1 the guest reboots
 *   hang    sleeps until insmod gets a signal, then fails with -EINTR
 *   lockup  spins with preemption disabled: that CPU never comes back
 *   none    loads and does nothing
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bug.h>
#include <linux/compiler.h>
#include <linux/delay.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/preempt.h>
#include <linux/sched/signal.h>
#include <linux/string.h>

static char *mode = "oops";
module_param(mode, charp, 0444);
MODULE_PARM_DESC(mode,
		 "Fault at load: oops (default), bug, warn, panic, hang, lockup, none");

static noinline void kci_panic_null_deref(void)
{
	int *ptr = NULL;

	OPTIMIZER_HIDE_VAR(ptr);
	WRITE_ONCE(*ptr, 0x6b6369);
}

static int kci_panic_hang(void)
{
	while (!signal_pending(current))
		msleep_interruptible(1000);
	pr_info("hang interrupted by a signal\n");
	return -EINTR;
}

static void kci_panic_lockup(void)
{
	preempt_disable();
	for (;;)
		cpu_relax();
}

static int __init kci_panic_init(void)
{
	pr_info("mode=%s\n", mode);
	if (!strcmp(mode, "oops")) {
		kci_panic_null_deref();
	} else if (!strcmp(mode, "bug")) {
		BUG();
	} else if (!strcmp(mode, "warn")) {
		WARN_ON(1);
	} else if (!strcmp(mode, "panic")) {
		panic("kci-panic: requested");
	} else if (!strcmp(mode, "hang")) {
		return kci_panic_hang();
	} else if (!strcmp(mode, "lockup")) {
		kci_panic_lockup();
	} else if (strcmp(mode, "none")) {
		pr_err("unknown mode \"%s\"\n", mode);
		return -EINVAL;
	}
	return 0;
}

static void __exit kci_panic_exit(void)
{
	pr_info("unloaded (mode=%s)\n", mode);
}

module_init(kci_panic_init);
module_exit(kci_panic_exit);

MODULE_DESCRIPTION("kernel-ci fault injection module");
MODULE_AUTHOR("kernel-ci");
MODULE_LICENSE("GPL");
