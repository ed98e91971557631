// SPDX-License-Identifier: GPL-2.0
/*
 * ptrace-basics: the classic ptrace requests on the kernel under test (x86_64).
 *
 * Every case forks its own tracee, checks one behaviour and reaps the tracee (SIGKILL if it is still
 * there). A watchdog interrupts any waitpid() that would block for ever, so a kernel that loses a stop
 * fails the check instead of hanging the suite. The watchdog is a process sleeping in nanosleep() that
 * then sends SIGALRM: alarm(2) needs CONFIG_POSIX_TIMERS, which the CI kernel need not have.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../lib/ktap.h"

#define WATCHDOG_SECONDS	30
#define STEP_LOOP		1000	/* iterations of the single-stepped loop: 2 instructions each */
#define STEP_RUNS		3
#define STEP_SPREAD		16	/* max - min instruction count allowed across the runs */
#define STEP_OVERHEAD_MAX	200	/* instructions outside the loop: the return from kill(), the exit */
#define MAGIC_BEFORE		0x1122334455667788UL
#define MAGIC_AFTER		0x8877665544332211UL
#define FAKE_RETVAL		4242
#define AUDIT_ARCH_X86_64_	0xc000003eU

static pid_t watchdog_pid;

static void on_alarm(int sig)
{
	(void)sig;	/* only interrupts a blocking waitpid() (no SA_RESTART) */
}

static void watchdog_cancel(void)
{
	if (watchdog_pid > 0) {
		kill(watchdog_pid, SIGKILL);
		while (waitpid(watchdog_pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	watchdog_pid = 0;
}

static void watchdog(void)
{
	struct timespec left = { WATCHDOG_SECONDS, 0 };
	struct sigaction sa;
	pid_t parent = getpid();

	watchdog_cancel();
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	watchdog_pid = fork();
	if (watchdog_pid == 0) {
		while (nanosleep(&left, &left) != 0 && errno == EINTR)
			;
		kill(parent, SIGALRM);
		_exit(0);
	}
}

/* waitpid() with __WALL; returns -1 (and a diagnostic) on error or watchdog expiry. */
static pid_t wait_for(pid_t pid, int *status)
{
	pid_t got = waitpid(pid, status, __WALL);

	if (got < 0)
		ktap_diag("waitpid(%d): %s", pid, errno == EINTR ? "timed out" : strerror(errno));
	return got;
}

static void describe(const char *what, int status)
{
	if (WIFSTOPPED(status))
		ktap_diag("%s: stopped by signal %d (status 0x%x)", what, WSTOPSIG(status), status);
	else if (WIFEXITED(status))
		ktap_diag("%s: exited with %d", what, WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		ktap_diag("%s: killed by signal %d", what, WTERMSIG(status));
	else
		ktap_diag("%s: status 0x%x", what, status);
}

static void reap(pid_t pid)
{
	int status;

	if (pid <= 0)
		return;
	kill(pid, SIGKILL);
	while (waitpid(pid, &status, __WALL) < 0 && errno == EINTR)
		;
	watchdog_cancel();
}

/* The child side of most cases: become a tracee and stop, so the parent knows where it is. */
static void child_traceme_and_stop(void)
{
	if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
		_exit(100);
	if (kill(getpid(), SIGSTOP) != 0)
		_exit(101);
}

/* Fork a child that runs fn after TRACEME + SIGSTOP; returns its pid once it sits in that stop. */
static pid_t fork_stopped_tracee(void (*fn)(void *), void *arg)
{
	int status;
	pid_t pid = fork();

	if (pid < 0) {
		ktap_diag("fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		child_traceme_and_stop();
		fn(arg);
		_exit(0);
	}
	watchdog();
	if (wait_for(pid, &status) < 0 || !WIFSTOPPED(status) || WSTOPSIG(status) != SIGSTOP) {
		describe("tracee's initial stop", status);
		reap(pid);
		return -1;
	}
	return pid;
}

static bool read_proc_field(pid_t pid, const char *file, const char *field, char *out, size_t size)
{
	char path[64], line[256];
	size_t len = strlen(field);
	bool found = false;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/%s", pid, file);
	f = fopen(path, "r");
	if (!f)
		return false;
	while (fgets(line, sizeof(line), f)) {
		if (!field[0] || (strncmp(line, field, len) == 0 && line[len] == ':')) {
			char *value = field[0] ? line + len + 1 : line;

			value += strspn(value, " \t");
			value[strcspn(value, "\n")] = '\0';
			snprintf(out, size, "%s", value);
			found = true;
			break;
		}
	}
	fclose(f);
	return found;
}

/* ---- PTRACE_TRACEME + exec: the tracee stops with SIGTRAP after a successful execve -------------- */

KTAP_TEST(traceme_exec)
{
	static const char *const true_paths[] = { "/bin/true", "/usr/bin/true" };
	const char *prog = NULL;
	char comm[64] = "";
	int status = 0;
	pid_t pid;

	for (size_t i = 0; i < KTAP_ARRAY_SIZE(true_paths) && !prog; i++)
		if (access(true_paths[i], X_OK) == 0)
			prog = true_paths[i];
	if (!prog) {
		ktap_skip("exec_stop_is_sigtrap", "no true(1) in the guest to exec");
		ktap_skip("stop_is_after_exec", "no true(1) in the guest to exec");
		ktap_skip("runs_to_exit", "no true(1) in the guest to exec");
		return;
	}
	pid = fork();
	if (pid < 0) {
		ktap_diag("fork: %s", strerror(errno));
		ktap_ok(false, "exec_stop_is_sigtrap");
		return;
	}
	if (pid == 0) {
		if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
			_exit(100);
		execl(prog, "true", (char *)NULL);
		_exit(101);
	}
	watchdog();
	if (wait_for(pid, &status) < 0) {
		ktap_ok(false, "exec_stop_is_sigtrap");
		reap(pid);
		return;
	}
	if (!(WIFSTOPPED(status) && WSTOPSIG(status) == SIGTRAP))
		describe("first stop", status);
	if (!ktap_ok(WIFSTOPPED(status) && WSTOPSIG(status) == SIGTRAP, "exec_stop_is_sigtrap")) {
		reap(pid);
		return;
	}
	/* The image is already the new program at this stop: comm is the exec'd file's name. */
	read_proc_field(pid, "comm", "", comm, sizeof(comm));
	if (strcmp(comm, "true") != 0)
		ktap_diag("/proc/%d/comm is \"%s\" at the stop, expected \"true\"", pid, comm);
	ktap_ok(strcmp(comm, "true") == 0, "stop_is_after_exec");
	if (ptrace(PTRACE_CONT, pid, NULL, NULL) != 0)
		ktap_diag("PTRACE_CONT: %s", strerror(errno));
	if (wait_for(pid, &status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		describe("after PTRACE_CONT", status);
		ktap_ok(false, "runs_to_exit");
		reap(pid);
		return;
	}
	watchdog_cancel();
	ktap_ok(true, "runs_to_exit");
}

/* ---- PEEKDATA / POKEDATA on a heap word ------------------------------------------------------------ */

static void child_check_word(void *arg)
{
	volatile uint64_t *word = arg;

	_exit(*word == MAGIC_AFTER ? 0 : 1);
}

KTAP_TEST(peek_poke)
{
	uint64_t *word = malloc(sizeof(*word));	/* the same address in the forked child */
	long value;
	int status = 0;
	pid_t pid;

	if (!word) {
		ktap_ok(false, "peek_reads_child_word");
		return;
	}
	*word = MAGIC_BEFORE;
	pid = fork_stopped_tracee(child_check_word, word);
	*word = 0;	/* the parent's copy differs: a PEEK reading our own memory would fail */
	if (pid < 0) {
		ktap_ok(false, "peek_reads_child_word");
		free(word);
		return;
	}
	errno = 0;
	value = ptrace(PTRACE_PEEKDATA, pid, word, NULL);
	if (errno || (uint64_t)value != MAGIC_BEFORE)
		ktap_diag("PEEKDATA %p: 0x%lx (%s)", (void *)word, value, errno ? strerror(errno) : "no error");
	ktap_ok(!errno && (uint64_t)value == MAGIC_BEFORE, "peek_reads_child_word");

	if (ptrace(PTRACE_POKEDATA, pid, word, (void *)MAGIC_AFTER) != 0)
		ktap_diag("POKEDATA: %s", strerror(errno));
	errno = 0;
	value = ptrace(PTRACE_PEEKDATA, pid, word, NULL);
	if (errno || (uint64_t)value != MAGIC_AFTER)
		ktap_diag("PEEKDATA after POKEDATA: 0x%lx (%s)", value, errno ? strerror(errno) : "no error");
	ktap_ok(!errno && (uint64_t)value == MAGIC_AFTER, "poke_then_peek");

	ptrace(PTRACE_CONT, pid, NULL, NULL);
	if (wait_for(pid, &status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		describe("child reading the poked word", status);
	ktap_ok(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child_sees_poked_word");
	if (*word != 0)
		ktap_diag("the tracer's own copy changed to 0x%lx", (unsigned long)*word);
	ktap_ok(*word == 0, "tracer_copy_untouched");
	reap(pid);
	free(word);
}

/* ---- GETREGS / SETREGS: change what getpid() returns --------------------------------------------- */

static void child_getpid_to_pipe(void *arg)
{
	int fd = *(int *)arg;
	long got = syscall(SYS_getpid);

	_exit(write(fd, &got, sizeof(got)) == sizeof(got) ? 0 : 1);
}

/* PTRACE_SYSCALL until a stop where the tracee is at syscall nr; entry selects entry or exit. */
static bool run_to_syscall(pid_t pid, long nr, bool entry)
{
	struct __ptrace_syscall_info info;
	int status;

	for (int stops = 0; stops < 10000; stops++) {
		if (ptrace(PTRACE_SYSCALL, pid, NULL, NULL) != 0) {
			ktap_diag("PTRACE_SYSCALL: %s", strerror(errno));
			return false;
		}
		if (wait_for(pid, &status) < 0)
			return false;
		if (!WIFSTOPPED(status)) {
			describe("waiting for a syscall stop", status);
			return false;
		}
		if (WSTOPSIG(status) != (SIGTRAP | 0x80))
			continue;
		memset(&info, 0, sizeof(info));
		if (ptrace(PTRACE_GET_SYSCALL_INFO, pid, (void *)sizeof(info), &info) <= 0) {
			ktap_diag("PTRACE_GET_SYSCALL_INFO: %s", strerror(errno));
			return false;
		}
		if (entry && info.op == PTRACE_SYSCALL_INFO_ENTRY && (long)info.entry.nr == nr)
			return true;
		if (!entry && info.op == PTRACE_SYSCALL_INFO_EXIT)
			return true;	/* the exit of the call whose entry the caller stopped at */
	}
	ktap_diag("no stop at syscall %ld after 10000 stops", nr);
	return false;
}

KTAP_TEST(regs_retval)
{
	struct user_regs_struct regs;
	int fds[2], status = 0;
	long reported = 0;
	bool ok;
	pid_t pid;

	if (pipe(fds) != 0) {
		ktap_diag("pipe: %s", strerror(errno));
		ktap_ok(false, "getregs_at_entry");
		return;
	}
	pid = fork_stopped_tracee(child_getpid_to_pipe, &fds[1]);
	close(fds[1]);
	if (pid < 0 || ptrace(PTRACE_SETOPTIONS, pid, NULL, (void *)PTRACE_O_TRACESYSGOOD) != 0) {
		ktap_ok(false, "getregs_at_entry");
		close(fds[0]);
		reap(pid);
		return;
	}
	ok = run_to_syscall(pid, SYS_getpid, true) && ptrace(PTRACE_GETREGS, pid, NULL, &regs) == 0;
	if (ok && regs.orig_rax != SYS_getpid)
		ktap_diag("orig_rax %llu at the getpid entry", regs.orig_rax);
	if (!ktap_ok(ok && regs.orig_rax == SYS_getpid, "getregs_at_entry")) {
		close(fds[0]);
		reap(pid);
		return;
	}
	ok = run_to_syscall(pid, SYS_getpid, false) && ptrace(PTRACE_GETREGS, pid, NULL, &regs) == 0;
	if (ok && (long)regs.rax != pid)
		ktap_diag("rax %lld at the getpid exit, expected the pid %d", (long long)regs.rax, pid);
	ktap_ok(ok && (long)regs.rax == pid, "getregs_at_exit_has_real_result");
	regs.rax = FAKE_RETVAL;
	ok = ok && ptrace(PTRACE_SETREGS, pid, NULL, &regs) == 0;
	if (!ok)
		ktap_diag("PTRACE_SETREGS: %s", strerror(errno));
	ptrace(PTRACE_CONT, pid, NULL, NULL);
	if (read(fds[0], &reported, sizeof(reported)) != sizeof(reported))
		ktap_diag("read the child's getpid() result: %s", strerror(errno));
	if (reported != FAKE_RETVAL)
		ktap_diag("the child's getpid() returned %ld, expected %d", reported, FAKE_RETVAL);
	ktap_ok(ok && reported == FAKE_RETVAL, "setregs_changes_return_value");
	if (wait_for(pid, &status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		describe("child after the changed getpid", status);
	ktap_ok(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child_exits_normally");
	close(fds[0]);
	reap(pid);
}

/* ---- PTRACE_SYSCALL entry/exit pairs, TRACESYSGOOD, GET_SYSCALL_INFO ------------------------------ */

static void child_known_syscalls(void *arg)
{
	(void)arg;
	syscall(SYS_getppid);
	syscall(SYS_getuid);
	syscall(SYS_exit_group, 0);
}

KTAP_TEST(syscall_pairs)
{
	struct __ptrace_syscall_info info;
	int status = 0, stops = 0, other_stops = 0, bad_order = 0, bad_arch = 0;
	long seen_nr[64];
	long getppid_rval = -1, uid_rval = -1;
	int entries = 0, exits = 0, depth = 0;
	long last_nr = -1;
	pid_t pid;

	pid = fork_stopped_tracee(child_known_syscalls, NULL);
	if (pid < 0 || ptrace(PTRACE_SETOPTIONS, pid, NULL, (void *)PTRACE_O_TRACESYSGOOD) != 0) {
		ktap_ok(false, "stops_marked_tracesysgood");
		reap(pid);
		return;
	}
	for (;;) {
		if (ptrace(PTRACE_SYSCALL, pid, NULL, NULL) != 0 || wait_for(pid, &status) < 0)
			break;
		if (!WIFSTOPPED(status))
			break;
		stops++;
		if (WSTOPSIG(status) != (SIGTRAP | 0x80)) {
			other_stops++;
			describe("a stop that is not a syscall stop", status);
			continue;
		}
		memset(&info, 0, sizeof(info));
		if (ptrace(PTRACE_GET_SYSCALL_INFO, pid, (void *)sizeof(info), &info) <= 0) {
			ktap_diag("PTRACE_GET_SYSCALL_INFO: %s", strerror(errno));
			bad_order++;
			continue;
		}
		if (info.arch != AUDIT_ARCH_X86_64_)
			bad_arch++;
		if (info.op == PTRACE_SYSCALL_INFO_ENTRY) {
			if (depth != 0)
				bad_order++;
			depth = 1;
			last_nr = (long)info.entry.nr;
			if (entries < (int)KTAP_ARRAY_SIZE(seen_nr))
				seen_nr[entries] = last_nr;
			entries++;
		} else if (info.op == PTRACE_SYSCALL_INFO_EXIT) {
			if (depth != 1)
				bad_order++;
			depth = 0;
			exits++;
			if (last_nr == SYS_getppid)
				getppid_rval = info.exit.rval;
			if (last_nr == SYS_getuid)
				uid_rval = info.exit.rval;
		} else {
			ktap_diag("GET_SYSCALL_INFO op %u at a syscall stop", info.op);
			bad_order++;
		}
	}
	if (other_stops)
		ktap_diag("%d of %d stops were not SIGTRAP|0x80", other_stops, stops);
	ktap_ok(stops > 0 && other_stops == 0, "stops_marked_tracesysgood");
	if (bad_arch)
		ktap_diag("%d stops reported an arch other than AUDIT_ARCH_X86_64", bad_arch);
	ktap_ok(stops > 0 && bad_arch == 0, "arch_is_x86_64");
	if (bad_order || entries != exits + 1)
		ktap_diag("%d entries, %d exits, %d out of order", entries, exits, bad_order);
	/* exit_group has an entry stop and no exit stop: one entry more than exits */
	ktap_ok(entries >= 3 && bad_order == 0 && entries == exits + 1, "entry_exit_alternate");
	{
		bool in_order = entries >= 3 && seen_nr[entries - 3] == SYS_getppid &&
				seen_nr[entries - 2] == SYS_getuid && seen_nr[entries - 1] == SYS_exit_group;

		if (!in_order && entries >= 3)
			ktap_diag("last entries: %ld %ld %ld", seen_nr[entries - 3], seen_nr[entries - 2],
				  seen_nr[entries - 1]);
		ktap_ok(in_order, "entry_numbers_match_the_calls");
	}
	if (getppid_rval != getpid() || uid_rval != (long)getuid())
		ktap_diag("getppid returned %ld (want %d), getuid %ld (want %d)", getppid_rval, getpid(),
			  uid_rval, getuid());
	ktap_ok(getppid_rval == getpid() && uid_rval == (long)getuid(), "exit_values_match");
	if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
		describe("end of the traced child", status);
	ktap_ok(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child_exits_via_exit_group");
	reap(pid);
}

/* ---- single-step instruction counter ---------------------------------------------------------------- */

static void child_small_program(void *arg)
{
	(void)arg;
	/* 1 + 2 * STEP_LOOP instructions, then exit(0) by hand: nothing else runs after the loop. */
	__asm__ volatile(
		"mov %0, %%ecx\n"
		"1: dec %%ecx\n"
		"jnz 1b\n"
		"mov $60, %%eax\n"
		"xor %%edi, %%edi\n"
		"syscall\n"
		:
		: "i"(STEP_LOOP)
		: "ecx", "eax", "edi", "memory");
}

static long count_steps(void)
{
	long steps = 0;
	int status;
	pid_t pid = fork_stopped_tracee(child_small_program, NULL);

	if (pid < 0)
		return -1;
	for (;;) {
		if (ptrace(PTRACE_SINGLESTEP, pid, NULL, NULL) != 0) {
			ktap_diag("PTRACE_SINGLESTEP: %s", strerror(errno));
			steps = -1;
			break;
		}
		if (wait_for(pid, &status) < 0) {
			steps = -1;
			break;
		}
		if (WIFEXITED(status)) {
			if (WEXITSTATUS(status) != 0)
				steps = -1;
			break;
		}
		if (!WIFSTOPPED(status) || WSTOPSIG(status) != SIGTRAP) {
			describe("single-step", status);
			steps = -1;
			break;
		}
		steps++;
	}
	reap(pid);
	return steps;
}

KTAP_TEST(single_step)
{
	long counts[STEP_RUNS], min = -1, max = -1;

	for (int i = 0; i < STEP_RUNS; i++) {
		counts[i] = count_steps();
		if (min < 0 || counts[i] < min)
			min = counts[i];
		if (counts[i] > max)
			max = counts[i];
	}
	ktap_diag("instructions stepped: %ld %ld %ld (loop alone: %d)", counts[0], counts[1], counts[2],
		  1 + 2 * STEP_LOOP);
	ktap_ok(min > 0, "positive_count");
	ktap_ok(min >= 1 + 2 * STEP_LOOP && max <= 1 + 2 * STEP_LOOP + STEP_OVERHEAD_MAX,
		"count_covers_the_loop");
	ktap_ok(min > 0 && max - min <= STEP_SPREAD, "stable_across_runs");
}

/* ---- ATTACH / DETACH of a running process ---------------------------------------------------------- */

KTAP_TEST(attach_detach)
{
	volatile unsigned long *counter;
	char tracer[32] = "", state[32] = "";
	unsigned long before, after;
	struct timespec pause_ts = { 0, 200 * 1000 * 1000 };
	int status = 0;
	pid_t pid;

	counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (counter == MAP_FAILED) {
		ktap_diag("mmap: %s", strerror(errno));
		ktap_ok(false, "attach_stops_with_sigstop");
		return;
	}
	*counter = 0;
	pid = fork();
	if (pid == 0) {
		for (;;)
			(*counter)++;
	}
	if (pid < 0) {
		ktap_diag("fork: %s", strerror(errno));
		ktap_ok(false, "attach_stops_with_sigstop");
		munmap((void *)counter, 4096);
		return;
	}
	while (*counter == 0)
		sched_yield();	/* it runs */
	watchdog();
	if (ptrace(PTRACE_ATTACH, pid, NULL, NULL) != 0)
		ktap_diag("PTRACE_ATTACH: %s", strerror(errno));
	else if (wait_for(pid, &status) < 0)
		status = 0;
	if (!(WIFSTOPPED(status) && WSTOPSIG(status) == SIGSTOP))
		describe("after PTRACE_ATTACH", status);
	if (!ktap_ok(WIFSTOPPED(status) && WSTOPSIG(status) == SIGSTOP, "attach_stops_with_sigstop")) {
		reap(pid);
		munmap((void *)counter, 4096);
		return;
	}
	read_proc_field(pid, "status", "TracerPid", tracer, sizeof(tracer));
	if (atoi(tracer) != getpid())
		ktap_diag("TracerPid: %s, expected %d", tracer, getpid());
	ktap_ok(atoi(tracer) == getpid(), "tracerpid_is_us");
	before = *counter;
	nanosleep(&pause_ts, NULL);
	if (*counter != before)
		ktap_diag("the counter moved from %lu to %lu while stopped", before, *counter);
	ktap_ok(*counter == before, "stopped_while_attached");

	if (ptrace(PTRACE_DETACH, pid, NULL, NULL) != 0)
		ktap_diag("PTRACE_DETACH: %s", strerror(errno));
	read_proc_field(pid, "status", "TracerPid", tracer, sizeof(tracer));
	if (atoi(tracer) != 0)
		ktap_diag("TracerPid after detach: %s", tracer);
	ktap_ok(atoi(tracer) == 0, "detach_clears_tracerpid");
	before = *counter;
	nanosleep(&pause_ts, NULL);
	after = *counter;
	read_proc_field(pid, "status", "State", state, sizeof(state));
	if (after == before || state[0] == 't' || state[0] == 'T')
		ktap_diag("counter %lu -> %lu, State: %s", before, after, state);
	ktap_ok(after != before && state[0] != 't' && state[0] != 'T', "runs_after_detach");
	errno = 0;
	ptrace(PTRACE_PEEKDATA, pid, (void *)counter, NULL);
	if (errno != ESRCH)
		ktap_diag("PEEKDATA after detach: %s", errno ? strerror(errno) : "succeeded");
	ktap_ok(errno == ESRCH, "no_longer_traced");
	reap(pid);
	munmap((void *)counter, 4096);
}

/* ---- PTRACE_KILL ----------------------------------------------------------------------------------- */

static void child_spin(void *arg)
{
	(void)arg;
	for (;;)
		pause();
}

KTAP_TEST(ptrace_kill)
{
	int status = 0;
	pid_t pid = fork_stopped_tracee(child_spin, NULL);

	if (pid < 0) {
		ktap_ok(false, "kill_accepted");
		return;
	}
	if (!ktap_ok(ptrace(PTRACE_KILL, pid, NULL, NULL) == 0, "kill_accepted"))
		ktap_diag("PTRACE_KILL: %s", strerror(errno));
	if (wait_for(pid, &status) < 0)
		status = 0;
	if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
		describe("after PTRACE_KILL", status);
	ktap_ok(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "tracee_dies_by_sigkill");
	errno = 0;
	if (waitpid(pid, &status, WNOHANG | __WALL) >= 0 || errno != ECHILD) {
		ktap_diag("the tracee is still there after being reaped");
		ktap_ok(false, "reaped");
		reap(pid);
		return;
	}
	watchdog_cancel();
	ktap_ok(true, "reaped");
}

static const struct ktap_case cases[] = {
	KTAP_CASE(traceme_exec),
	KTAP_CASE(peek_poke),
	KTAP_CASE(regs_retval),
	KTAP_CASE(syscall_pairs),
	KTAP_CASE(single_step),
	KTAP_CASE(attach_detach),
	KTAP_CASE(ptrace_kill),
};

int main(void)
{
	int status = ktap_run(cases, KTAP_ARRAY_SIZE(cases));

	watchdog_cancel();
	return status;
}
