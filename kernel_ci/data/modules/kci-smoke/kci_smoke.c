// SPDX-License-Identifier: GPL-2.0
/*
 * kci_smoke - the kernel-ci smoke-test module.
 *
 * Proves that an out-of-tree module built against the kernel under test
 * loads, logs and unloads, and gives the guest suites something to inspect
 * in sysfs:
 *
 *   /sys/module/kci_smoke/parameters/tag    (0444) word set at load time
 *   /sys/module/kci_smoke/parameters/value  (0644) integer, read and write
 *
 * Log lines (the suites match them in dmesg):
 *   kci_smoke: loaded (tag=<tag> value=<value>)
 *   kci_smoke: unloaded (tag=<tag> value=<value>)
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

static char *tag = "smoke";
module_param(tag, charp, 0444);
MODULE_PARM_DESC(tag, "Word echoed in the load and unload messages");

static int value = 42;
module_param(value, int, 0644);
MODULE_PARM_DESC(value, "Integer readable and writable through sysfs");

static int __init kci_smoke_init(void)
{
	pr_info("loaded (tag=%s value=%d)\n", tag, value);
	return 0;
}

static void __exit kci_smoke_exit(void)
{
	pr_info("unloaded (tag=%s value=%d)\n", tag, value);
}

module_init(kci_smoke_init);
module_exit(kci_smoke_exit);

MODULE_DESCRIPTION("kernel-ci smoke-test module");
MODULE_AUTHOR("kernel-ci");
MODULE_LICENSE("GPL");
