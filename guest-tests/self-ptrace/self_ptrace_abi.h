/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The self-ptrace ABI (kernel-patches/self-ptrace), for a suite built on the host against headers
 * that do not have it. Values from include/uapi/linux/ptrace.h and include/uapi/asm-generic/siginfo.h
 * of the patched tree.
 */
#ifndef SELF_PTRACE_ABI_H
#define SELF_PTRACE_ABI_H

#ifndef PTRACE_SELF_ON
#define PTRACE_SELF_ON		0x4281
#endif
#ifndef PTRACE_SELF_OFF
#define PTRACE_SELF_OFF		0x4282
#endif
#ifndef SYS_SECCOMP
#define SYS_SECCOMP		1
#endif
#ifndef SYS_SELF_PTRACE
#define SYS_SELF_PTRACE		3
#endif
#ifndef AUDIT_ARCH_X86_64
#define AUDIT_ARCH_X86_64	0xc000003eU	/* EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE */
#endif

#endif /* SELF_PTRACE_ABI_H */
