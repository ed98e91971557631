// SPDX-License-Identifier: GPL-2.0
/*
 * self-ptrace: the self-ptrace series (kernel-patches/self-ptrace) on the kernel under test.
 *
 * ptrace(PTRACE_SELF_ON, 0, 0, 0) makes the calling thread's next system call (other than
 * rt_sigreturn and ptrace) not execute: the thread is disarmed and gets a SIGSYS with
 * si_code SYS_SELF_PTRACE, si_syscall, si_call_addr (after the syscall instruction) and si_arch;
 * the registers of the call are in the handler's ucontext and the rax it leaves there is what
 * the call returns.
 *
 * The calls under test are made with inline syscall instructions (raw_syscall()), so that no C
 * library code runs between arming and the call, and the address after the instruction is known.
 * Scenarios that can kill or replace the process (exec, a blocked SIGSYS, seccomp, a real tracer)
 * run in a child; the parent checks what the child reports through its exit status.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>

#include "../lib/ktap.h"
#include "self_ptrace_abi.h"

#define EMULATED	4242L
#define REARM_CALLS	1000
#define EXEC_PROBE_ARG	"--exec-probe"
#define EXEC_PROBE_EXIT	42

/* One system call, its syscall instruction here; *after gets the address that follows it. */
static long raw_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6,
			unsigned long *after)
{
	register long r10 __asm__("r10") = a4;
	register long r8 __asm__("r8") = a5;
	register long r9 __asm__("r9") = a6;
	unsigned long addr;
	long ret;

	__asm__ volatile("lea 1f(%%rip), %1\n\t"
			 "syscall\n"
			 "1:"
			 : "=a"(ret), "=&r"(addr)
			 : "0"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	if (after)
		*after = addr;
	return ret;
}

/*
 * One 32-bit system call through int $0x80 from this 64-bit process: the compat entry, with the
 * i386 numbers and registers (CONFIG_IA32_EMULATION; without it the instruction faults: SIGSEGV).
 * r8-r11 are declared clobbered: kernels before 4.17.x did not preserve them on this path.
 */
static long int80_syscall(long nr, long a1, long a2, long a3)
{
	long ret;

	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "0"(nr), "b"(a1), "c"(a2), "d"(a3)
			 : "r8", "r9", "r10", "r11", "memory");
	return ret;
}

/* i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl) */
#define NR32_fork	2
#define NR32_execve	11
#define NR32_getpid	20
#define NR32_ptrace	26

#define sys0(nr)		raw_syscall((nr), 0, 0, 0, 0, 0, 0, NULL)
#define sys3(nr, a, b, c)	raw_syscall((nr), (long)(a), (long)(b), (long)(c), 0, 0, 0, NULL)

static long self_on(void)
{
	return sys3(SYS_ptrace, PTRACE_SELF_ON, 0, 0);
}

static long self_off(void)
{
	return sys3(SYS_ptrace, PTRACE_SELF_OFF, 0, 0);
}

/* What the SIGSYS handler does with the call it gets. */
enum mode {
	RECORD,		/* leave the registers as the kernel gave them */
	EMULATE,	/* return `value` */
	EMULATE_REARM,	/* return value + count, re-arm */
	REWIND,		/* point rsi/rdx at `rewind_buf`, back up rip: the syscall runs again */
	PERFORM,	/* perform the call for real with its own arguments */
	PERFORM_SHORT,	/* perform it with rdx - 1 */
};

static struct {
	enum mode mode;
	long value;
	const char *rewind_buf;
	long rewind_len;
	/* filled by the handler */
	int count;
	int signo, code, syscall, arch;
	unsigned long call_addr, rip;
	long rax, args[6];
	long rearm_err;
} hs;

static void on_sigsys(int sig, siginfo_t *si, void *ctx)
{
	greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
	long ret;

	(void)sig;
	hs.count++;
	hs.signo = si->si_signo;
	hs.code = si->si_code;
	hs.syscall = si->si_syscall;
	hs.arch = (int)si->si_arch;
	hs.call_addr = (unsigned long)si->si_call_addr;
	hs.rip = g[REG_RIP];
	hs.rax = g[REG_RAX];
	hs.args[0] = g[REG_RDI];
	hs.args[1] = g[REG_RSI];
	hs.args[2] = g[REG_RDX];
	hs.args[3] = g[REG_R10];
	hs.args[4] = g[REG_R8];
	hs.args[5] = g[REG_R9];

	switch (hs.mode) {
	case RECORD:
		break;
	case EMULATE:
		g[REG_RAX] = hs.value;
		break;
	case EMULATE_REARM:
		g[REG_RAX] = hs.value + hs.count;
		/* last thing before returning: every call after it is intercepted */
		ret = self_on();
		if (ret)
			hs.rearm_err = ret;
		break;
	case REWIND:
		g[REG_RSI] = (greg_t)hs.rewind_buf;
		g[REG_RDX] = hs.rewind_len;
		g[REG_RIP] -= 2;	/* "syscall" is 0f 05; rax still holds the number */
		break;
	case PERFORM:
	case PERFORM_SHORT:
		g[REG_RAX] = raw_syscall(si->si_syscall, g[REG_RDI], g[REG_RSI],
					 g[REG_RDX] - (hs.mode == PERFORM_SHORT), g[REG_R10],
					 g[REG_R8], g[REG_R9], NULL);
		break;
	}
}

static void handler_reset(enum mode mode, long value)
{
	memset(&hs, 0, sizeof(hs));
	hs.mode = mode;
	hs.value = value;
}

static bool install(int sig, void (*fn)(int, siginfo_t *, void *))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = fn;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL) == 0;
}

static bool install_sigsys(void)
{
	return install(SIGSYS, on_sigsys);
}

/* Arm, reporting a failure as the named check; false if not armed. */
static bool arm_or_fail(const char *check)
{
	long ret = self_on();

	if (ret) {
		ktap_diag("ptrace(PTRACE_SELF_ON, 0, 0, 0): %s", strerror((int)-ret));
		ktap_ok(false, "%s", check);
		return false;
	}
	return true;
}

static bool expect_long(const char *name, long got, long want)
{
	if (got != want)
		ktap_diag("%s: got %ld (%#lx), expected %ld (%#lx)", name, got, got, want, want);
	return ktap_ok(got == want, "%s", name);
}

/* Wait for a child; its exit status, or -signal, or -1000 if it could not be waited for. */
static int wait_child(pid_t pid)
{
	int status;

	if (waitpid(pid, &status, 0) != pid)
		return -1000;
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return -WTERMSIG(status);
	return -1000;
}

static void diag_status(const char *what, int st)
{
	if (st == -1000)
		ktap_diag("%s: waitpid failed", what);
	else if (st < 0)
		ktap_diag("%s: killed by signal %d (%s)", what, -st, strsignal(-st));
	else
		ktap_diag("%s: exit status %d", what, st);
}

/* A child reports up to 7 boolean checks as the bits of its exit status (bit set: failed). */
static void report_bits(const char *what, int st, const char *const *names, int count)
{
	int i;

	if (st < 0 || st >= 64) {
		diag_status(what, st);
		for (i = 0; i < count; i++)
			ktap_ok(false, "%s", names[i]);
		return;
	}
	for (i = 0; i < count; i++)
		ktap_ok(!(st & (1 << i)), "%s", names[i]);
}

KTAP_TEST(arm_and_getpid)
{
	unsigned long after = 0;
	pid_t pid = getpid();
	long ret;

	/* the handler leaves rax as the kernel put it: the number, as before the call */
	handler_reset(RECORD, 0);
	if (!arm_or_fail("arm"))
		return;
	ret = raw_syscall(SYS_getpid, 0, 0, 0, 0, 0, 0, &after);
	self_off();
	ktap_ok(true, "arm");
	expect_long("one_sigsys", hs.count, 1);
	expect_long("si_signo", hs.signo, SIGSYS);
	expect_long("si_code_self_ptrace", hs.code, SYS_SELF_PTRACE);
	expect_long("si_syscall_getpid", hs.syscall, SYS_getpid);
	expect_long("si_arch_x86_64", (unsigned int)hs.arch, AUDIT_ARCH_X86_64);
	expect_long("si_call_addr_after_syscall", (long)hs.call_addr, (long)after);
	expect_long("uc_rip_after_syscall", (long)hs.rip, (long)after);
	expect_long("uc_rax_is_the_number", hs.rax, SYS_getpid);
	if (ret == pid)
		ktap_diag("getpid returned the real pid: the call was executed");
	expect_long("getpid_not_executed", ret, SYS_getpid);
	ret = sys0(SYS_getpid);
	ktap_ok(ret == pid && hs.count == 1, "disarmed_after_sigsys");
}

KTAP_TEST(call_not_executed)
{
	int fds[2];
	char buf[8];
	long ret;

	if (pipe2(fds, O_NONBLOCK)) {
		ktap_diag("pipe2: %s", strerror(errno));
		ktap_ok(false, "write_skipped");
		return;
	}
	handler_reset(EMULATE, -EIO);
	if (!arm_or_fail("write_skipped"))
		goto out;
	ret = sys3(SYS_write, fds[1], "x", 1);
	self_off();
	expect_long("write_returns_emulated_eio", ret, -EIO);
	expect_long("si_syscall_write", hs.syscall, SYS_write);
	ret = read(fds[0], buf, sizeof(buf));
	if (ret >= 0)
		ktap_diag("the pipe holds %ld byte(s): the write was executed", ret);
	ktap_ok(ret < 0 && errno == EAGAIN, "write_skipped");
out:
	close(fds[0]);
	close(fds[1]);
}

KTAP_TEST(emulate_return_value)
{
	long ret;

	handler_reset(EMULATE, EMULATED);
	if (!arm_or_fail("getpid_returns_emulated"))
		return;
	ret = sys0(SYS_getpid);
	self_off();
	expect_long("getpid_returns_emulated", ret, EMULATED);

	handler_reset(EMULATE, -EPERM);
	if (!arm_or_fail("getppid_returns_emulated_eperm"))
		return;
	ret = sys0(SYS_getppid);
	self_off();
	expect_long("getppid_returns_emulated_eperm", ret, -EPERM);
	expect_long("si_syscall_getppid", hs.syscall, SYS_getppid);
}

KTAP_TEST(arguments)
{
	static const long want[6] = { 0x1111, -2, 0x3333333333L, 0x44, 0x5555, 0x666666 };
	char got[8] = "";
	int fds[2];
	long ret;
	bool same = true;
	int i;

	handler_reset(EMULATE, 0);
	if (!arm_or_fail("args_seen"))
		return;
	raw_syscall(SYS_getpid, want[0], want[1], want[2], want[3], want[4], want[5], NULL);
	self_off();
	for (i = 0; i < 6; i++) {
		if (hs.args[i] != want[i]) {
			ktap_diag("argument %d: got %#lx, expected %#lx", i + 1, hs.args[i], want[i]);
			same = false;
		}
	}
	ktap_ok(hs.count == 1 && same, "args_seen");

	if (pipe2(fds, O_NONBLOCK)) {
		ktap_diag("pipe2: %s", strerror(errno));
		ktap_ok(false, "changed_args_rewind");
		return;
	}
	/* change rsi/rdx and run the syscall instruction again, disarmed */
	handler_reset(REWIND, 0);
	hs.rewind_buf = "BB";
	hs.rewind_len = 2;
	if (arm_or_fail("changed_args_rewind")) {
		ret = sys3(SYS_write, fds[1], "AAAA", 4);
		self_off();
		memset(got, 0, sizeof(got));
		if (read(fds[0], got, sizeof(got) - 1) < 0)
			strcpy(got, "(empty)");
		if (ret != 2 || strcmp(got, "BB"))
			ktap_diag("write returned %ld, the pipe holds \"%s\"", ret, got);
		ktap_ok(hs.count == 1 && ret == 2 && !strcmp(got, "BB"), "changed_args_rewind");
	}

	/* perform the call from the handler with a changed length */
	handler_reset(PERFORM_SHORT, 0);
	if (arm_or_fail("changed_args_performed")) {
		ret = sys3(SYS_write, fds[1], "CCCC", 4);
		self_off();
		memset(got, 0, sizeof(got));
		if (read(fds[0], got, sizeof(got) - 1) < 0)
			strcpy(got, "(empty)");
		if (ret != 3 || strcmp(got, "CCC"))
			ktap_diag("write returned %ld, the pipe holds \"%s\"", ret, got);
		ktap_ok(hs.count == 1 && ret == 3 && !strcmp(got, "CCC"), "changed_args_performed");
	}
	close(fds[0]);
	close(fds[1]);
}

KTAP_TEST(rearm_from_handler)
{
	pid_t pid = getpid();
	int wrong = 0, i, first_wrong = -1;
	long ret, first_ret = 0;

	handler_reset(EMULATE_REARM, 100000);
	if (!arm_or_fail("every_call_emulated"))
		return;
	for (i = 1; i <= REARM_CALLS; i++) {
		ret = sys0(SYS_getpid);
		if (ret != 100000 + i && !wrong++) {
			first_wrong = i;
			first_ret = ret;
		}
	}
	ret = self_off();
	if (wrong)
		ktap_diag("%d of %d calls wrong, first: call %d returned %ld", wrong, REARM_CALLS,
			  first_wrong, first_ret);
	ktap_ok(!wrong, "every_call_emulated");
	expect_long("sigsys_count", hs.count, REARM_CALLS);
	expect_long("rearm_errors", hs.rearm_err, 0);
	expect_long("off_while_armed_returns_0", ret, 0);
	ret = sys0(SYS_getpid);
	ktap_ok(ret == pid && hs.count == REARM_CALLS, "real_after_off");
}

KTAP_TEST(off)
{
	pid_t pid = getpid();
	long ret;

	handler_reset(EMULATE, EMULATED);
	expect_long("off_unarmed_returns_0", self_off(), 0);
	if (!arm_or_fail("off_after_on"))
		return;
	expect_long("off_after_on", self_off(), 0);
	ret = sys0(SYS_getpid);
	expect_long("getpid_real", ret, pid);
	expect_long("no_sigsys", hs.count, 0);
}

static void on_sigusr1_arm(int sig, siginfo_t *si, void *ctx)
{
	(void)sig;
	(void)si;
	(void)ctx;
	self_on();	/* then return: rt_sigreturn must not be intercepted */
}

KTAP_TEST(exempt_calls)
{
	static const char *const names[] = { "rt_sigreturn_not_intercepted",
					     "next_call_intercepted" };
	long ret, on_ret, peek_ret;
	int on_count, peek_count;
	pid_t child;

	/* nothing is printed while armed: the write would be intercepted */
	handler_reset(EMULATE, EMULATED);
	if (!arm_or_fail("ptrace_self_on_not_intercepted"))
		return;
	on_ret = self_on();
	on_count = hs.count;
	peek_ret = sys3(SYS_ptrace, PTRACE_PEEKDATA, 0, 0);	/* pid 0: not a tracee of ours */
	peek_count = hs.count;
	ret = sys0(SYS_getpid);
	self_off();
	ktap_ok(on_ret == 0 && on_count == 0, "ptrace_self_on_not_intercepted");
	if (peek_ret != -ESRCH)
		ktap_diag("ptrace(PTRACE_PEEKDATA, 0): %ld", peek_ret);
	ktap_ok(peek_ret == -ESRCH && peek_count == 0, "other_ptrace_not_intercepted");
	ktap_ok(ret == EMULATED && hs.count == 1 && hs.syscall == SYS_getpid, "still_armed");

	/* a SIGUSR1 handler arms and returns: its rt_sigreturn must go through */
	child = fork();
	if (child == 0) {
		int bits = 0;

		handler_reset(EMULATE, EMULATED);
		if (!install(SIGUSR1, on_sigusr1_arm))
			_exit(127);
		sys3(SYS_kill, getpid(), SIGUSR1, 0);
		/* back here through rt_sigreturn, armed */
		ret = sys0(SYS_getpid);
		self_off();
		if (!(hs.count >= 1 && hs.syscall == SYS_getpid))
			bits |= 1;
		if (ret != EMULATED || hs.count != 1)
			bits |= 2;
		_exit(bits);
	}
	if (child < 0) {
		ktap_diag("fork: %s", strerror(errno));
		ret = -1000;
	} else {
		ret = wait_child(child);
	}
	report_bits("sigusr1 child", (int)ret, names, 2);
}

KTAP_TEST(bad_arguments)
{
	static const struct {
		const char *name;
		long request, pid, addr, data;
	} bad[] = {
		{ "on_pid_einval", PTRACE_SELF_ON, 1, 0, 0 },
		{ "on_addr_einval", PTRACE_SELF_ON, 0, 0x1000, 0 },
		{ "on_data_einval", PTRACE_SELF_ON, 0, 0, 1 },
		{ "off_pid_einval", PTRACE_SELF_OFF, 1, 0, 0 },
		{ "off_data_einval", PTRACE_SELF_OFF, 0, 0, 1 },
	};
	pid_t pid = getpid();
	long ret;
	size_t i;

	handler_reset(EMULATE, EMULATED);
	for (i = 0; i < KTAP_ARRAY_SIZE(bad); i++) {
		ret = raw_syscall(SYS_ptrace, bad[i].request, bad[i].pid, bad[i].addr, bad[i].data,
				  0, 0, NULL);
		expect_long(bad[i].name, ret, -EINVAL);
	}
	ret = sys3(SYS_ptrace, PTRACE_SELF_ON, pid, 0);
	expect_long("on_own_pid_einval", ret, -EINVAL);
	ret = sys0(SYS_getpid);
	ktap_ok(ret == pid && hs.count == 0, "not_armed_after_einval");
	self_off();
}

/* One stop of the traced child, as the tracer saw it. */
struct stop {
	int kind;	/* 'E' entry, 'X' exit, 'S' signal-delivery */
	long nr;	/* entry: syscall number; signal: si_syscall */
	long val;	/* entry: first argument; exit: return value; signal: si_code */
	int sig;
};

#define MAX_STOPS 64
#define CANCELLED_RET 777

/*
 * Trace child with PTRACE_SYSCALL until it exits, recording its stops; signals are delivered.
 * With cancel_getppid, the tracer cancels every getppid at its entry stop (orig_rax = -1) and makes
 * it return CANCELLED_RET.
 */
static int trace_child(pid_t child, struct stop *stops, int *n, bool cancel_getppid)
{
	struct user_regs_struct regs;
	struct __ptrace_syscall_info info;
	siginfo_t si;
	int status, sig = 0;

	*n = 0;
	if (waitpid(child, &status, 0) != child || !WIFSTOPPED(status))
		return -1;
	if (ptrace(PTRACE_SETOPTIONS, child, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL))
		return -1;
	for (;;) {
		if (ptrace(PTRACE_SYSCALL, child, 0, sig))
			return -1;
		sig = 0;
		if (waitpid(child, &status, 0) != child)
			return -1;
		if (WIFEXITED(status))
			return WEXITSTATUS(status);
		if (WIFSIGNALED(status))
			return -WTERMSIG(status);
		if (*n >= MAX_STOPS) {
			kill(child, SIGKILL);
			waitpid(child, &status, 0);
			return -1;
		}
		if (WSTOPSIG(status) == (SIGTRAP | 0x80)) {
			memset(&info, 0, sizeof(info));
			if (ptrace(PTRACE_GET_SYSCALL_INFO, child, sizeof(info), &info) <= 0)
				return -1;
			if (info.op == PTRACE_SYSCALL_INFO_ENTRY)
				stops[*n] = (struct stop){ 'E', (long)info.entry.nr,
							   (long)info.entry.args[0], 0 };
			else
				stops[*n] = (struct stop){ 'X', -1, (long)info.exit.rval, 0 };
			if (cancel_getppid && info.op == PTRACE_SYSCALL_INFO_ENTRY &&
			    info.entry.nr == SYS_getppid) {
				if (ptrace(PTRACE_GETREGS, child, 0, &regs))
					return -1;
				regs.orig_rax = -1;
				regs.rax = CANCELLED_RET;
				if (ptrace(PTRACE_SETREGS, child, 0, &regs))
					return -1;
			}
		} else {
			sig = WSTOPSIG(status);
			memset(&si, 0, sizeof(si));
			ptrace(PTRACE_GETSIGINFO, child, 0, &si);
			stops[*n] = (struct stop){ 'S', sig == SIGSYS ? si.si_syscall : -1,
						   si.si_code, sig };
		}
		(*n)++;
	}
}

KTAP_TEST(real_tracer)
{
	struct stop stops[MAX_STOPS];
	int n = 0, st, i, on = -1;
	pid_t child;

	child = fork();
	if (child == 0) {
		long ret;

		if (ptrace(PTRACE_TRACEME, 0, 0, 0))
			_exit(120);
		raise(SIGSTOP);
		handler_reset(EMULATE, EMULATED);
		if (self_on())
			_exit(121);
		ret = sys0(SYS_getpid);
		self_off();
		_exit(ret == EMULATED && hs.count == 1 && hs.code == SYS_SELF_PTRACE ? 0 : 1);
	}
	if (child < 0) {
		ktap_diag("fork: %s", strerror(errno));
		ktap_ok(false, "tracee_emulated");
		return;
	}
	st = trace_child(child, stops, &n, false);
	for (i = 0; i < n; i++) {
		if (stops[i].kind == 'E' && stops[i].nr == SYS_ptrace && stops[i].val == PTRACE_SELF_ON) {
			on = i;
			break;
		}
	}
	if (st != 0)
		diag_status("tracee", st);
	ktap_ok(st == 0, "tracee_emulated");
	if (on < 0 || on + 5 > n) {
		ktap_diag("%d stops, PTRACE_SELF_ON entry at %d", n, on);
		ktap_ok(false, "stops_in_order");
		return;
	}
	/* [on] entry ptrace, [on+1] its exit, then the intercepted getpid */
	ktap_ok(stops[on + 1].kind == 'X' && stops[on + 1].val == 0, "self_on_exit_stop");
	ktap_ok(stops[on + 2].kind == 'E' && stops[on + 2].nr == SYS_getpid, "getpid_entry_stop");
	if (stops[on + 3].kind == 'X' && stops[on + 3].val != SYS_getpid)
		ktap_diag("getpid exit stop: rax %ld", stops[on + 3].val);
	ktap_ok(stops[on + 3].kind == 'X' && stops[on + 3].val == SYS_getpid,
		"getpid_exit_stop_rax_is_number");
	if (stops[on + 4].kind != 'S')
		ktap_diag("stop %d: kind %c nr %ld", on + 4, stops[on + 4].kind, stops[on + 4].nr);
	ktap_ok(stops[on + 4].kind == 'S' && stops[on + 4].sig == SIGSYS &&
		stops[on + 4].val == SYS_SELF_PTRACE && stops[on + 4].nr == SYS_getpid,
		"sigsys_delivery_stop_after_exit");
	ktap_ok(on + 5 < n && stops[on + 5].kind == 'E' && stops[on + 5].nr == SYS_rt_sigreturn,
		"then_handler_rt_sigreturn");
}

KTAP_TEST(tracer_cancels_call)
{
	static const char *const names[] = { "cancelled_call_returns_tracer_value",
					     "cancelled_call_not_intercepted",
					     "still_armed_after_cancel" };
	struct stop stops[MAX_STOPS];
	int n = 0, st;
	pid_t child;

	child = fork();
	if (child == 0) {
		int bits = 0;
		long ret;

		if (ptrace(PTRACE_TRACEME, 0, 0, 0))
			_exit(120);
		raise(SIGSTOP);
		handler_reset(EMULATE, EMULATED);
		if (self_on())
			_exit(121);
		ret = sys0(SYS_getppid);	/* cancelled by the tracer at its entry stop */
		if (ret != CANCELLED_RET)
			bits |= 1;
		if (hs.count != 0)
			bits |= 2;
		ret = sys0(SYS_getpid);
		self_off();
		if (ret != EMULATED || hs.count != 1 || hs.syscall != SYS_getpid)
			bits |= 4;
		_exit(bits);
	}
	if (child < 0) {
		ktap_diag("fork: %s", strerror(errno));
		st = -1000;
	} else {
		st = trace_child(child, stops, &n, true);
	}
	report_bits("tracee", st, names, 3);
}

/* Per thread: a thread arms itself, the main thread's calls are not intercepted. */
static atomic_int thread_phase;
static pid_t armed_tid;

static void *armed_thread(void *arg)
{
	long ret;

	(void)arg;
	armed_tid = (pid_t)sys0(SYS_gettid);
	if (self_on()) {
		atomic_store(&thread_phase, -1);
		return NULL;
	}
	atomic_store(&thread_phase, 1);
	while (atomic_load(&thread_phase) == 1)	/* no system call while the main thread checks */
		;
	ret = sys0(SYS_getpid);
	self_off();
	return (void *)ret;
}

KTAP_TEST(per_thread)
{
	pthread_t thread;
	void *result = NULL;
	pid_t pid = getpid();
	long ret;
	int err;

	handler_reset(EMULATE, EMULATED);
	atomic_store(&thread_phase, 0);
	err = pthread_create(&thread, NULL, armed_thread, NULL);
	if (err) {
		ktap_diag("pthread_create: %s", strerror(err));
		ktap_ok(false, "other_thread_not_armed");
		return;
	}
	while (atomic_load(&thread_phase) == 0)
		;
	ret = sys0(SYS_getpid);		/* the main thread is not armed */
	ktap_ok(atomic_load(&thread_phase) == 1 && ret == pid && hs.count == 0,
		"other_thread_not_armed");
	atomic_store(&thread_phase, 2);
	pthread_join(thread, &result);
	ktap_ok((long)result == EMULATED && hs.count == 1, "armed_thread_intercepted");
}

KTAP_TEST(fork_semantics)
{
	pid_t pid = getpid();
	int status;
	long ret;

	/* an armed fork is intercepted: no child */
	handler_reset(EMULATE, -EAGAIN);
	if (!arm_or_fail("fork_intercepted"))
		return;
	ret = sys0(SYS_fork);
	self_off();
	if (ret == 0)	/* the fork was executed and this is the child */
		_exit(0);
	ktap_ok(ret == -EAGAIN && hs.count == 1 && hs.syscall == SYS_fork, "fork_intercepted");
	ret = waitpid(-1, &status, WNOHANG);
	ktap_ok(ret == -1 && errno == ECHILD, "no_child_created");

	/* the handler performs the fork: the child runs disarmed, so does the parent */
	handler_reset(PERFORM, 0);
	if (!arm_or_fail("fork_performed_by_handler"))
		return;
	ret = sys0(SYS_fork);
	if (ret == 0) {
		int before = hs.count;

		sys0(SYS_getppid);
		_exit(hs.count == before ? 0 : 1);
	}
	self_off();
	ktap_ok(ret > 0 && hs.count == 1, "fork_performed_by_handler");
	status = ret > 0 ? wait_child((pid_t)ret) : -1000;
	if (status != 0)
		diag_status("forked child", status);
	ktap_ok(status == 0, "child_not_armed");
	ret = sys0(SYS_getpid);
	ktap_ok(ret == pid && hs.count == 1, "parent_disarmed");
}

KTAP_TEST(exec_semantics)
{
	char *const argv[] = { "self-ptrace", EXEC_PROBE_ARG, NULL };
	pid_t child;
	long ret;

	/* an armed execve is intercepted: the program goes on */
	child = fork();
	if (child == 0) {
		handler_reset(EMULATE, -ENOEXEC);
		if (self_on())
			_exit(121);
		ret = sys3(SYS_execve, "/proc/self/exe", argv, environ);
		self_off();
		_exit(ret == -ENOEXEC && hs.count == 1 && hs.syscall == SYS_execve ? 0 : 1);
	}
	ret = child > 0 ? wait_child(child) : -1000;
	if (ret != 0)	/* EXEC_PROBE_EXIT: the execve was executed */
		diag_status("execve child", (int)ret);
	ktap_ok(ret == 0, "execve_intercepted");

	/*
	 * The handler performs the execve: the new program must start disarmed, else its first
	 * system call would be a SIGSYS with the default action.
	 */
	child = fork();
	if (child == 0) {
		handler_reset(PERFORM, 0);
		if (self_on())
			_exit(121);
		sys3(SYS_execve, "/proc/self/exe", argv, environ);
		_exit(122);	/* the execve failed */
	}
	ret = child > 0 ? wait_child(child) : -1000;
	if (ret != EXEC_PROBE_EXIT)
		diag_status("exec'd child", (int)ret);
	ktap_ok(ret == EXEC_PROBE_EXIT, "new_image_not_armed");
}

static int exec_probe(void)
{
	/* exec'd by exec_semantics with default signal actions: armed, this would die of SIGSYS */
	if (sys0(SYS_getpid) != getpid())
		return 1;
	return EXEC_PROBE_EXIT;
}

static void no_core(void)
{
	struct rlimit rl = { 0, 0 };

	setrlimit(RLIMIT_CORE, &rl);
}

KTAP_TEST(signal_masking)
{
	pid_t child;
	int st;

	/* a blocked SIGSYS cannot be left pending for a skipped call: the process dies */
	child = fork();
	if (child == 0) {
		sigset_t set;

		no_core();
		sigemptyset(&set);
		sigaddset(&set, SIGSYS);
		sigprocmask(SIG_BLOCK, &set, NULL);
		if (self_on())
			_exit(121);
		sys0(SYS_getpid);
		_exit(0);
	}
	st = child > 0 ? wait_child(child) : -1000;
	if (st != -SIGSYS)
		diag_status("child with SIGSYS blocked", st);
	ktap_ok(st == -SIGSYS, "blocked_sigsys_kills");

	child = fork();
	if (child == 0) {
		no_core();
		signal(SIGSYS, SIG_IGN);
		if (self_on())
			_exit(121);
		sys0(SYS_getpid);
		_exit(0);
	}
	st = child > 0 ? wait_child(child) : -1000;
	if (st != -SIGSYS)
		diag_status("child with SIGSYS ignored", st);
	ktap_ok(st == -SIGSYS, "ignored_sigsys_kills");
}

KTAP_TEST(seccomp_order)
{
	static const char *const names[] = { "filter_installed", "skipped_call_not_filtered",
					     "sigsys_from_self_ptrace", "performed_call_filtered" };
	pid_t child;

	child = fork();
	if (child == 0) {
		struct sock_filter insns[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 77),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = { KTAP_ARRAY_SIZE(insns), insns };
		int bits = 0;
		long ret;

		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
		    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog))
			_exit(15);
		/* the skipped call never reaches the filter */
		handler_reset(EMULATE, EMULATED);
		if (self_on())
			_exit(121);
		ret = sys0(SYS_getppid);
		if (ret != EMULATED)
			bits |= 2;
		if (hs.count != 1 || hs.code != SYS_SELF_PTRACE)
			bits |= 4;
		/* the call the handler performs does */
		handler_reset(PERFORM, 0);
		if (self_on())
			_exit(121);
		ret = sys0(SYS_getppid);
		if (ret != -77 || hs.count != 1)
			bits |= 8;
		_exit(bits);
	}
	report_bits("seccomp child", child > 0 ? wait_child(child) : -1000, names, 4);
}

/*
 * The number of a 64-bit system call is all of rax. On 5.10 the dispatcher compares the whole
 * register with NR_syscalls, so (1 << 32) | 39 is not getpid but ENOSYS; syscall_get_nr(), which
 * the entry work code uses, is an int and would report it as 39. An armed thread must not turn
 * such a number into another call: it fails with ENOSYS, without a SIGSYS, and stays armed.
 */
#define HIGH_BITS(nr)	((long)((1UL << 32) | (nr)))

KTAP_TEST(out_of_range_number)
{
	long ret, off_ret;
	int count;

	handler_reset(EMULATE, EMULATED);
	/* what the kernel does with it when the thread has no entry work: no system call */
	expect_long("unarmed_high_bits_enosys", sys0(HIGH_BITS(SYS_getpid)), -ENOSYS);

	if (!arm_or_fail("armed_high_bits_enosys"))
		return;
	ret = sys0(HIGH_BITS(SYS_getpid));
	count = hs.count;
	self_off();
	if (count)
		ktap_diag("reported to the handler as system call %d (rax %#lx)", hs.syscall, hs.rax);
	ktap_ok(ret == -ENOSYS && count == 0, "armed_high_bits_enosys");

	if (!arm_or_fail("armed_negative_high_bits_enosys"))
		return;
	ret = sys0((long)(0xffffffff00000000UL | SYS_getppid));
	count = hs.count;
	self_off();
	ktap_ok(ret == -ENOSYS && count == 0, "armed_negative_high_bits_enosys");

	/* ENOSYS leaves the thread armed, like any call that is not intercepted */
	if (!arm_or_fail("still_armed_after_enosys"))
		return;
	sys0(HIGH_BITS(SYS_getpid));
	ret = sys0(SYS_getpid);
	self_off();
	ktap_ok(ret == EMULATED && hs.count == 1 && hs.syscall == SYS_getpid, "still_armed_after_enosys");

	/* the exempt numbers only count without high bits: this is not ptrace(PTRACE_SELF_OFF) */
	handler_reset(EMULATE, EMULATED);
	if (!arm_or_fail("high_bits_not_exempt"))
		return;
	off_ret = sys3(HIGH_BITS(SYS_ptrace), PTRACE_SELF_OFF, 0, 0);
	ret = sys0(SYS_getpid);
	self_off();
	if (off_ret != -ENOSYS)
		ktap_diag("(1 << 32) | __NR_ptrace returned %ld", off_ret);
	ktap_ok(off_ret == -ENOSYS && ret == EMULATED && hs.count == 1, "high_bits_not_exempt");

	/* a number that fits is intercepted even if the kernel has no such call: it can be emulated */
	handler_reset(EMULATE, EMULATED);
	if (!arm_or_fail("unknown_number_intercepted"))
		return;
	ret = sys0(1000);
	self_off();
	ktap_ok(ret == EMULATED && hs.count == 1 && hs.syscall == 1000 && hs.rax == 1000,
		"unknown_number_intercepted");
}

/*
 * Why self-ptrace cannot simply let such a number through: vanilla 5.10 truncates it as soon as
 * the thread has entry work (here an allow-all seccomp filter), and (1 << 32) | 39 runs getpid.
 */
KTAP_TEST(entry_work_truncates)
{
	static const char *const names[] = { "filter_installed", "high_bits_run_getpid_with_entry_work" };
	pid_t child;

	child = fork();
	if (child == 0) {
		struct sock_filter insns[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
		struct sock_fprog prog = { KTAP_ARRAY_SIZE(insns), insns };

		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
		    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog))
			_exit(1);
		_exit(sys0(HIGH_BITS(SYS_getpid)) == sys0(SYS_getpid) ? 0 : 2);
	}
	report_bits("seccomp child", child > 0 ? wait_child(child) : -1000, names, 2);
}

/* The compat exclusion: int $0x80 from an armed 64-bit thread runs, and leaves it armed. */
KTAP_TEST(compat_int80)
{
	static const char *const names[] = { "int80_getpid_not_intercepted", "still_armed_after_int80",
					     "compat_self_on_esrch", "compat_self_on_not_armed" };
	pid_t child;
	int st;

	child = fork();
	if (child == 0) {
		pid_t pid = getpid();
		int bits = 0;
		long ret;

		handler_reset(EMULATE, EMULATED);
		if (self_on())
			_exit(121);
		ret = int80_syscall(NR32_getpid, 0, 0, 0);
		if (ret != pid || hs.count)
			bits |= 1;
		ret = sys0(SYS_getpid);
		if (ret != EMULATED || hs.count != 1)
			bits |= 2;
		self_off();
		/* the requests are native only: the compat ptrace has no PTRACE_SELF_ON */
		handler_reset(EMULATE, EMULATED);
		ret = int80_syscall(NR32_ptrace, PTRACE_SELF_ON, 0, 0);
		if (ret != -ESRCH)
			bits |= 4;
		ret = sys0(SYS_getpid);
		self_off();
		if (ret != pid || hs.count)
			bits |= 8;
		_exit(bits);
	}
	st = child > 0 ? wait_child(child) : -1000;
	if (st == -SIGSEGV)
		ktap_diag("int $0x80 faulted: is CONFIG_IA32_EMULATION set?");
	report_bits("int $0x80 child", st, names, 4);
}

/*
 * A fork that is not intercepted: the compat fork of an armed thread. The new task must start
 * disarmed (copy_process()), its parent stays armed.
 */
KTAP_TEST(compat_fork_child_disarmed)
{
	static const char *const names[] = { "int80_fork_not_intercepted", "parent_still_armed",
					     "child_starts_disarmed" };
	pid_t child;
	int st;

	child = fork();
	if (child == 0) {
		int bits = 0, gst;
		long ret, forked;

		handler_reset(EMULATE, EMULATED);
		if (self_on())
			_exit(121);
		ret = int80_syscall(NR32_fork, 0, 0, 0);
		if (ret == 0) {
			/* the new task: armed, this getppid would be a SIGSYS and count */
			int before = hs.count;

			sys0(SYS_getppid);
			_exit(hs.count == before ? 0 : 1);
		}
		if (ret <= 0 || hs.count)
			bits |= 1;
		forked = ret;
		ret = sys0(SYS_getpid);
		self_off();
		if (ret != EMULATED || hs.count != 1)
			bits |= 2;
		gst = forked > 0 ? wait_child((pid_t)forked) : -1000;
		if (gst != 0)
			bits |= 4;
		_exit(bits);
	}
	st = child > 0 ? wait_child(child) : -1000;
	if (st == -SIGSEGV)
		ktap_diag("int $0x80 faulted: is CONFIG_IA32_EMULATION set?");
	report_bits("int $0x80 fork child", st, names, 3);
}

/*
 * An exec that is not intercepted: the compat execve of an armed thread. The new program must
 * start disarmed (begin_new_exec()): armed, its first system call would kill it with SIGSYS.
 * Its path and argv are 32-bit pointers, so they live in a MAP_32BIT page.
 */
KTAP_TEST(compat_exec_disarms)
{
	static const char path[] = "/proc/self/exe", arg0[] = "self-ptrace";
	pid_t child;
	int st;

	child = fork();
	if (child == 0) {
		char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
		uint32_t *argv32;
		char *p, *a0, *a1;

		if (page == MAP_FAILED)
			_exit(120);
		argv32 = (uint32_t *)page;
		p = page + 64;
		a0 = p + sizeof(path);
		a1 = a0 + sizeof(arg0);
		memcpy(p, path, sizeof(path));
		memcpy(a0, arg0, sizeof(arg0));
		memcpy(a1, EXEC_PROBE_ARG, sizeof(EXEC_PROBE_ARG));
		argv32[0] = (uint32_t)(uintptr_t)a0;
		argv32[1] = (uint32_t)(uintptr_t)a1;
		argv32[2] = 0;
		if (self_on())
			_exit(121);
		int80_syscall(NR32_execve, (long)(uintptr_t)p, (long)(uintptr_t)argv32, 0);
		_exit(122);	/* the execve failed or was intercepted (then SIGSYS kills first) */
	}
	st = child > 0 ? wait_child(child) : -1000;
	if (st != EXEC_PROBE_EXIT) {
		diag_status("int $0x80 exec'd child", st);
		if (st == -SIGSEGV)
			ktap_diag("int $0x80 faulted: is CONFIG_IA32_EMULATION set?");
	}
	ktap_ok(st == EXEC_PROBE_EXIT, "new_image_not_armed");
}

/* The SelfPtrace: line of /proc/PID/status, -1 if there is none. */
static int status_self_ptrace(pid_t pid)
{
	char path[64], line[256];
	int val = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "SelfPtrace: %d", &val) == 1)
			break;
	fclose(f);
	return val;
}

/*
 * Wait (at most ~20 s) for *phase to leave `from`; returns the new phase, or -1 if the child
 * exited first (its status in *st, as wait_child() gives it).
 */
static int wait_phase(atomic_int *phase, int from, pid_t child, int *st)
{
	int status, i;

	for (i = 0; i < 200000; i++) {
		if (atomic_load(phase) != from)
			return atomic_load(phase);
		if (*st == -2000 && waitpid(child, &status, WNOHANG) == child) {
			*st = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
			return -1;
		}
		usleep(100);
	}
	return -1;
}

/*
 * What a checkpoint/restore tool reads: SelfPtrace: in /proc/PID/status, 1 while the thread is
 * armed. The child arms itself and spins without a system call while the parent looks.
 */
KTAP_TEST(proc_status)
{
	atomic_int *phase;
	pid_t child;
	int st = -2000, armed = -1, after = -1;

	expect_long("status_unarmed", status_self_ptrace(getpid()), 0);
	phase = mmap(NULL, sizeof(*phase), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (phase == MAP_FAILED) {
		ktap_diag("mmap: %s", strerror(errno));
		ktap_ok(false, "status_armed");
		return;
	}
	atomic_store(phase, 0);
	child = fork();
	if (child == 0) {
		handler_reset(EMULATE, EMULATED);
		if (self_on())
			_exit(121);
		atomic_store(phase, 1);
		while (atomic_load(phase) == 1)
			;
		sys0(SYS_getpid);	/* intercepted: disarms */
		atomic_store(phase, 3);
		while (atomic_load(phase) == 3)
			;
		_exit(hs.count == 1 ? 0 : 1);
	}
	if (child < 0) {
		ktap_diag("fork: %s", strerror(errno));
		ktap_ok(false, "status_armed");
		return;
	}
	if (wait_phase(phase, 0, child, &st) == 1) {
		armed = status_self_ptrace(child);
		atomic_store(phase, 2);
		if (wait_phase(phase, 2, child, &st) == 3)
			after = status_self_ptrace(child);
		atomic_store(phase, 4);
	}
	if (st == -2000)
		st = wait_child(child);
	expect_long("status_armed", armed, 1);
	expect_long("status_disarmed_by_sigsys", after, 0);
	if (st != 0)
		diag_status("armed child", st);
	ktap_ok(st == 0, "child_intercepted_once");
	munmap(phase, sizeof(*phase));
}

static const struct ktap_case cases[] = {
	KTAP_CASE(arm_and_getpid),
	KTAP_CASE(call_not_executed),
	KTAP_CASE(emulate_return_value),
	KTAP_CASE(arguments),
	KTAP_CASE(rearm_from_handler),
	KTAP_CASE(off),
	KTAP_CASE(exempt_calls),
	KTAP_CASE(bad_arguments),
	KTAP_CASE(real_tracer),
	KTAP_CASE(tracer_cancels_call),
	KTAP_CASE(per_thread),
	KTAP_CASE(fork_semantics),
	KTAP_CASE(exec_semantics),
	KTAP_CASE(signal_masking),
	KTAP_CASE(seccomp_order),
	KTAP_CASE(out_of_range_number),
	KTAP_CASE(entry_work_truncates),
	KTAP_CASE(compat_int80),
	KTAP_CASE(compat_fork_child_disarmed),
	KTAP_CASE(compat_exec_disarms),
	KTAP_CASE(proc_status),
};

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], EXEC_PROBE_ARG))
		return exec_probe();
	/*
	 * A skipped getpid returns its number (39): if that is also our pid, an executed getpid
	 * could not be told from a skipped one. Run the cases in a child then, its pid is another.
	 */
	if (getpid() == SYS_getpid) {
		pid_t child = fork();
		int st;

		if (child < 0) {
			perror("fork");
			return 1;
		}
		if (child > 0) {
			st = wait_child(child);
			return st < 0 ? 1 : st;
		}
	}
	if (!install_sigsys()) {
		perror("sigaction(SIGSYS)");
		return 1;
	}
	return ktap_run(cases, KTAP_ARRAY_SIZE(cases));
}
