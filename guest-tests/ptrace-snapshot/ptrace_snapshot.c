// SPDX-License-Identifier: GPL-2.0
/*
 * ptrace-snapshot: PTRACE_SNAPSHOT, PTRACE_RESTORE and PTRACE_GETSNAPSHOT
 * (kernel-patches/ptrace-snapshot) from a real tracer on real tracees.
 *
 * One KTAP result per scenario (one JUnit testcase each); every check of a
 * scenario prints a "# ok: ..." or "# FAIL: ..." line before that result, so
 * the report carries what was checked and what went wrong. A scenario also
 * fails when the kernel logs a warning, BUG, oops or lockdep report while it
 * runs (read from /dev/kmsg).
 *
 * Tracees are forked children that PTRACE_TRACEME and then stop themselves
 * with SIGSTOP in a loop. The tracer makes one do something (fill memory,
 * mprotect, munmap, exit) by writing a command into its copy of `cmd` with
 * PTRACE_POKEDATA and resuming it with SIGUSR1 injected: the handler runs
 * the command and the tracee stops again. The regions are heap memory
 * malloc()ed before the fork, so they have the same address in the tracer
 * and in every tracee.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>

#include "../lib/ktap.h"
#include "ptrace_snapshot_abi.h"

#define MAX_LEN		PTRACE_SNAPSHOT_MAX_LEN
#define MAX_TOTAL	PTRACE_SNAPSHOT_MAX_TOTAL
#define PG		4096UL

int main(int argc, char **argv);

/* ------------------------------------------------------------------ checks */

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static int scenario_failures;

static void note(const char *fmt, ...) KTAP_PRINTF(1, 2);
static void note(const char *fmt, ...)
{
	char line[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	pthread_mutex_lock(&out_lock);
	ktap_diag("%s", line);
	pthread_mutex_unlock(&out_lock);
}

static bool check(bool cond, const char *fmt, ...) KTAP_PRINTF(2, 3);
static bool check(bool cond, const char *fmt, ...)
{
	char line[480];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	pthread_mutex_lock(&out_lock);
	if (!cond)
		scenario_failures++;
	ktap_diag("%s: %s", cond ? "ok" : "FAIL", line);
	pthread_mutex_unlock(&out_lock);
	return cond;
}

static const char *errname(long ret)
{
	static __thread char other[32];

	switch (-ret) {
	case 0: return "0";
	case EINVAL: return "EINVAL";
	case E2BIG: return "E2BIG";
	case EIO: return "EIO";
	case ENOSPC: return "ENOSPC";
	case ENOENT: return "ENOENT";
	case EFAULT: return "EFAULT";
	case ESRCH: return "ESRCH";
	case EPERM: return "EPERM";
	case ENOMEM: return "ENOMEM";
	case EINTR: return "EINTR";
	}
	snprintf(other, sizeof(other), "%ld", ret);
	return other;
}

/* ptrace() through syscall(2): -errno on failure, the kernel's return value otherwise. */
static long pt(long op, pid_t pid, unsigned long addr, unsigned long data)
{
	long ret = syscall(SYS_ptrace, op, pid, addr, data);

	return ret < 0 ? -errno : ret;
}

static long snap(pid_t pid, const void *start, unsigned long len)
{
	return pt(PTRACE_SNAPSHOT, pid, (unsigned long)start, len);
}

static long restore(pid_t pid, const void *start, unsigned long len)
{
	return pt(PTRACE_RESTORE, pid, (unsigned long)start, len);
}

static long getsnap(pid_t pid, const void *start, void *buf, unsigned long len)
{
	struct ptrace_snapshot_buf sb = { .buf = (unsigned long)buf, .len = len };

	return pt(PTRACE_GETSNAPSHOT, pid, (unsigned long)start, (unsigned long)&sb);
}

static bool expect(long got, long want, const char *what)
{
	if (want < 0)
		return check(got == want, "%s -> %s (expected %s)", what,
			     got < 0 ? errname(got) : got ? "a length" : "0", errname(want));
	return check(got == want, "%s -> %ld%s%s (expected %ld)", what, got, got < 0 ? " " : "",
		     got < 0 ? errname(got) : "", want);
}

#define EXPECT(call, want)	expect((call), (want), #call)

/* ----------------------------------------------------------------- tracees */

enum { CMD_NONE, CMD_FILL, CMD_PROTECT, CMD_UNMAP, CMD_EXIT, CMD_MUTATE, CMD_EXEC };

#define IDLE_ARG	"--stopped-tracee"

struct command {
	int op;
	int arg;
	unsigned long addr;
	unsigned long len;
	unsigned long gen;
	int result;
};

/* Same address in every process of the suite: the tracer writes the tracee's copy. */
static volatile struct command cmd;

static void mutate(unsigned char *p, unsigned long len, unsigned long gen)
{
	unsigned long i;

	for (i = 0; i < len; i++)
		p[i] = (unsigned char)(p[i] * 31 + gen + i);
}

static void tracee_on_usr1(int sig)
{
	unsigned char *p = (unsigned char *)cmd.addr;
	unsigned long i;
	int r = 0;

	(void)sig;
	switch (cmd.op) {
	case CMD_FILL:
		for (i = 0; i < cmd.len; i++)
			p[i] = (unsigned char)cmd.arg;
		break;
	case CMD_PROTECT:
		r = mprotect(p, cmd.len, cmd.arg);
		break;
	case CMD_UNMAP:
		r = munmap(p, cmd.len);
		break;
	case CMD_EXIT:
		_exit(0);
	case CMD_MUTATE:
		mutate(p, cmd.len, cmd.gen);
		break;
	case CMD_EXEC: {
		char *const argv[] = { "ptrace-snapshot", IDLE_ARG, NULL };

		execv("/proc/self/exe", argv);
		r = -1;
		break;
	}
	}
	cmd.result = r ? errno : 0;
}

static void tracee_setup_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = tracee_on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
}

static bool wait_stopped(pid_t pid)
{
	int status;

	for (;;) {
		if (waitpid(pid, &status, __WALL) < 0) {
			if (errno == EINTR)
				continue;
			note("waitpid(%d): %s", pid, strerror(errno));
			return false;
		}
		if (WIFSTOPPED(status))
			return true;
		note("tracee %d ended (status 0x%x) instead of stopping", pid, status);
		return false;
	}
}

/* A stopped tracee of the calling thread, or -1. */
static pid_t spawn_tracee(void)
{
	pid_t pid = fork();

	if (pid < 0) {
		note("fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		tracee_setup_signals();
		if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) < 0)
			_exit(100);
		for (;;)
			raise(SIGSTOP);
	}
	if (!wait_stopped(pid))
		return -1;
	if (pt(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL) < 0)
		note("PTRACE_SETOPTIONS(%d): %s", pid, strerror(errno));
	return pid;
}

static void reap(pid_t pid)
{
	int status;

	if (pid <= 0)
		return;
	kill(pid, SIGKILL);
	while (waitpid(pid, &status, __WALL) >= 0 || errno == EINTR) {
		if (WIFEXITED(status) || WIFSIGNALED(status))
			break;
	}
}

/*
 * The stopped tracee's memory, word by word with PTRACE_PEEKDATA / PTRACE_POKEDATA (the
 * base config has no CONFIG_CROSS_MEMORY_ATTACH, so no process_vm_readv()).
 */
static bool peek_word(pid_t pid, unsigned long addr, unsigned long *word)
{
	long w;

	errno = 0;
	w = ptrace(PTRACE_PEEKDATA, pid, (void *)addr, NULL);
	if (w == -1 && errno)
		return false;
	*word = (unsigned long)w;
	return true;
}

static bool vm_read(pid_t pid, const void *addr, void *buf, size_t len)
{
	unsigned long start = (unsigned long)addr, word;
	unsigned char *out = buf;
	size_t done = 0;

	while (done < len) {
		unsigned long at = (start + done) & ~7UL, off = start + done - at;
		size_t n = 8 - off < len - done ? 8 - off : len - done;

		if (!peek_word(pid, at, &word))
			return false;
		memcpy(out + done, (unsigned char *)&word + off, n);
		done += n;
	}
	return true;
}

static bool vm_write(pid_t pid, const volatile void *addr, const void *buf, size_t len)
{
	unsigned long start = (unsigned long)addr, word;
	const unsigned char *in = buf;
	size_t done = 0;

	while (done < len) {
		unsigned long at = (start + done) & ~7UL, off = start + done - at;
		size_t n = 8 - off < len - done ? 8 - off : len - done;

		if (n < 8 && !peek_word(pid, at, &word))
			return false;
		memcpy((unsigned char *)&word + off, in + done, n);
		if (ptrace(PTRACE_POKEDATA, pid, (void *)at, (void *)word) < 0)
			return false;
		done += n;
	}
	return true;
}

/* Have the stopped tracee run one command; 0, or the command's errno, or -1. */
static int tracee_do(pid_t pid, int op, const void *addr, unsigned long len, int arg,
		     unsigned long gen)
{
	struct command c = { .op = op, .arg = arg, .addr = (unsigned long)addr, .len = len,
			     .gen = gen, .result = -1 };

	if (!vm_write(pid, &cmd, &c, sizeof(c))) {
		note("PTRACE_POKEDATA(%d): %s", pid, strerror(errno));
		return -1;
	}
	if (pt(PTRACE_CONT, pid, 0, SIGUSR1) < 0) {
		note("PTRACE_CONT(%d): %s", pid, strerror(errno));
		return -1;
	}
	if (op == CMD_EXIT)
		return 0;
	if (!wait_stopped(pid))
		return -1;
	if (!vm_read(pid, (const void *)&cmd, &c, sizeof(c)))
		return -1;
	return c.result;
}

static bool tracee_fill(pid_t pid, const void *addr, unsigned long len, int byte)
{
	return tracee_do(pid, CMD_FILL, addr, len, byte, 0) == 0;
}

static bool tracee_protect(pid_t pid, const void *addr, unsigned long len, int prot)
{
	return tracee_do(pid, CMD_PROTECT, addr, len, prot, 0) == 0;
}

/* Does the tracee's [addr, addr + len) equal want? Reports the first difference. */
static bool tracee_equals(pid_t pid, const void *addr, const void *want, size_t len,
			  const char *what)
{
	unsigned char *got = malloc(len);
	size_t i = 0;
	bool same;

	if (!got || !vm_read(pid, addr, got, len)) {
		free(got);
		return check(false, "%s: cannot read the tracee's memory", what);
	}
	same = memcmp(got, want, len) == 0;
	if (!same) {
		while (got[i] == ((const unsigned char *)want)[i])
			i++;
		note("%s: byte %zu is 0x%02x, expected 0x%02x", what, i, got[i],
		     ((const unsigned char *)want)[i]);
	}
	free(got);
	return check(same, "%s", what);
}

static bool all_bytes(const void *p, size_t len, int byte)
{
	const unsigned char *c = p;
	size_t i;

	for (i = 0; i < len; i++)
		if (c[i] != (unsigned char)byte)
			return false;
	return true;
}

static void pattern(void *p, size_t len, unsigned int seed)
{
	unsigned char *c = p;
	size_t i;

	for (i = 0; i < len; i++)
		c[i] = (unsigned char)(i * 7 + seed * 13 + (i >> 8));
}

/* The malloc()ed struct most scenarios work on: spans more than one page. */
struct record {
	unsigned long id;
	char name[61];
	double values[32];
	unsigned char blob[9000];
};

static struct record *new_record(unsigned int seed)
{
	struct record *rec = malloc(sizeof(*rec));

	if (rec)
		pattern(rec, sizeof(*rec), seed);
	return rec;
}

static long meminfo_kb(const char *key)
{
	char line[256];
	size_t klen = strlen(key);
	long value = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, klen) && line[klen] == ':') {
			value = strtol(line + klen + 1, NULL, 10);
			break;
		}
	fclose(f);
	return value;
}

/* ------------------------------------------------------------------ scenarios */

/* Snapshot -> the tracee changes the memory -> restore -> the memory is the snapshot again. */
static void restore_roundtrip(void)
{
	struct record *rec = new_record(1);
	struct record orig;
	const char *start;
	unsigned long len;
	pid_t pid;

	if (!check(rec != NULL, "malloc"))
		return;
	orig = *rec;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, rec, sizeof(*rec)), 0);
	check(tracee_fill(pid, rec, sizeof(*rec), 0xab), "the tracee overwrote the struct");
	memset(rec, 0xab, sizeof(*rec));
	tracee_equals(pid, rec, rec, sizeof(*rec), "tracee memory changed before restore");
	EXPECT(restore(pid, rec, sizeof(*rec)), 0);
	tracee_equals(pid, rec, &orig, sizeof(*rec), "tracee memory equals the snapshot after restore");

	/* An unaligned start and odd length across a page boundary. */
	start = rec->name + 3;
	len = sizeof(*rec) - 3 - offsetof(struct record, name) - 5;
	EXPECT(snap(pid, start, len), 0);
	check(tracee_fill(pid, rec, sizeof(*rec), 0x11), "the tracee overwrote the struct again");
	EXPECT(restore(pid, start, len), 0);
	memcpy(rec, &orig, sizeof(*rec));
	memset(rec, 0x11, 3 + offsetof(struct record, name));
	memset((char *)rec + sizeof(*rec) - 5, 0x11, 5);
	tracee_equals(pid, rec, rec, sizeof(*rec),
		      "unaligned region restored, the bytes around it untouched");
	reap(pid);
out:
	free(rec);
}

/* GETSNAPSHOT: the saved bytes, a truncated copy into a short buffer, the full length. */
static void getsnapshot(void)
{
	struct record *rec = new_record(2);
	const size_t len = sizeof(*rec);
	unsigned char *buf = malloc(len + 256);
	struct record orig;
	long ret;
	pid_t pid;

	if (!check(rec && buf, "malloc"))
		goto out;
	orig = *rec;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, rec, len), 0);
	check(tracee_fill(pid, rec, len, 0x5a), "the tracee overwrote the struct");

	memset(buf, 0xee, len + 256);
	ret = getsnap(pid, rec, buf, len);
	check(ret == (long)len, "GETSNAPSHOT with an exact buffer returns %ld (expected %zu)", ret,
	      len);
	check(!memcmp(buf, &orig, len), "the copy is the saved bytes, not the tracee's new ones");

	memset(buf, 0xee, len + 256);
	ret = getsnap(pid, rec, buf, 100);
	check(ret == (long)len, "short buffer (100 bytes): returns the full length %ld (expected %zu)",
	      ret, len);
	check(!memcmp(buf, &orig, 100), "short buffer: its 100 bytes are the snapshot's first 100");
	check(all_bytes(buf + 100, len + 156, 0xee), "short buffer: nothing written past 100 bytes");

	memset(buf, 0xee, len + 256);
	ret = getsnap(pid, rec, buf, len + 256);
	check(ret == (long)len, "larger buffer: returns %ld (expected %zu)", ret, len);
	check(!memcmp(buf, &orig, len) && all_bytes(buf + len, 256, 0xee),
	      "larger buffer: the snapshot, nothing written after it");

	ret = getsnap(pid, rec, NULL, 0);
	check(ret == (long)len, "zero-length buffer (NULL) returns the length %ld", ret);
	ret = getsnap(pid, rec + 0, buf, len);
	check(ret == (long)len, "the snapshot is kept after GETSNAPSHOT (%ld)", ret);
	EXPECT(getsnap(pid, (char *)rec + 1, buf, len), -ENOENT);
	reap(pid);
out:
	free(buf);
	free(rec);
}

/* A restore drops the snapshot: the second one fails with ENOENT. */
static void restore_twice(void)
{
	struct record *rec = new_record(3);
	char byte;
	pid_t pid;

	if (!check(rec != NULL, "malloc"))
		return;
	pid = spawn_tracee();
	if (check(pid > 0, "tracee started")) {
		EXPECT(snap(pid, rec, sizeof(*rec)), 0);
		EXPECT(restore(pid, rec, sizeof(*rec)), 0);
		EXPECT(restore(pid, rec, sizeof(*rec)), -ENOENT);
		EXPECT(getsnap(pid, rec, &byte, 1), -ENOENT);
		EXPECT(snap(pid, rec, sizeof(*rec)), 0);
		EXPECT(restore(pid, rec, sizeof(*rec)), 0);
		EXPECT(restore(pid, rec, sizeof(*rec)), -ENOENT);
	}
	reap(pid);
	free(rec);
}

/* A snapshot at the same start replaces the old one, whatever its length. */
static void replace_snapshot(void)
{
	struct record *rec = new_record(4);
	const size_t len = sizeof(*rec), half = sizeof(*rec) / 2;
	unsigned char *buf = malloc(len);
	unsigned char *want = malloc(len);
	pid_t pid;

	if (!check(rec && buf && want, "malloc"))
		goto out;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, rec, len), 0);
	check(tracee_fill(pid, rec, len, 0x11), "tracee filled the struct with 0x11");
	EXPECT(snap(pid, rec, half), 0);
	check(getsnap(pid, rec, buf, len) == (long)half && all_bytes(buf, half, 0x11),
	      "GETSNAPSHOT: the new snapshot (half length, 0x11 bytes)");
	EXPECT(restore(pid, rec, len), -EINVAL);
	check(getsnap(pid, rec, buf, len) == (long)half, "a restore with the old length keeps it");
	check(tracee_fill(pid, rec, len, 0x22), "tracee filled the struct with 0x22");
	EXPECT(restore(pid, rec, half), 0);
	memset(want, 0x11, half);
	memset(want + half, 0x22, len - half);
	tracee_equals(pid, rec, want, len, "restore wrote the replacing snapshot only");
	EXPECT(getsnap(pid, rec, buf, len), -ENOENT);
	reap(pid);
out:
	free(want);
	free(buf);
	free(rec);
}

/* Several regions in one tracee, overlapping ones included, are independent. */
static void several_regions(void)
{
	struct record *rec = new_record(5);
	unsigned char *model = malloc(sizeof(*rec));
	unsigned char *a_save = malloc(sizeof(*rec)), *c_save = malloc(sizeof(*rec));
	unsigned char *b_save = malloc(sizeof(*rec)), *buf = malloc(sizeof(*rec));
	const unsigned char *base = (const unsigned char *)rec;
	const unsigned char *a, *b, *c;
	size_t alen, blen, clen;
	pid_t pid;

	if (!check(rec && model && a_save && b_save && c_save && buf, "malloc"))
		goto out;
	a = (const unsigned char *)rec->values;
	alen = sizeof(rec->values);
	b = rec->blob;
	blen = 4000;
	c = a + 8;			/* overlaps a and the start of b */
	clen = alen + 1000;
	memcpy(model, rec, sizeof(*rec));
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;

	EXPECT(snap(pid, a, alen), 0);
	memcpy(a_save, model + (a - base), alen);
	check(tracee_fill(pid, rec, sizeof(*rec), 0x33), "tracee filled with 0x33");
	memset(model, 0x33, sizeof(*rec));
	EXPECT(snap(pid, c, clen), 0);
	memcpy(c_save, model + (c - base), clen);
	check(tracee_fill(pid, rec, sizeof(*rec), 0x44), "tracee filled with 0x44");
	memset(model, 0x44, sizeof(*rec));
	EXPECT(snap(pid, b, blen), 0);
	memcpy(b_save, model + (b - base), blen);
	check(tracee_fill(pid, rec, sizeof(*rec), 0x55), "tracee filled with 0x55");
	memset(model, 0x55, sizeof(*rec));

	check(getsnap(pid, c, buf, clen) == (long)clen && !memcmp(buf, c_save, clen),
	      "GETSNAPSHOT of the overlapping region");
	EXPECT(restore(pid, a, alen), 0);
	memcpy(model + (a - base), a_save, alen);
	tracee_equals(pid, rec, model, sizeof(*rec), "region a restored, the rest untouched");
	check(getsnap(pid, c, buf, clen) == (long)clen && !memcmp(buf, c_save, clen),
	      "the overlapping snapshot is unchanged by a's restore");
	EXPECT(restore(pid, c, clen), 0);
	memcpy(model + (c - base), c_save, clen);
	tracee_equals(pid, rec, model, sizeof(*rec), "overlapping region c restored");
	EXPECT(restore(pid, b, blen), 0);
	memcpy(model + (b - base), b_save, blen);
	tracee_equals(pid, rec, model, sizeof(*rec), "region b restored");
	EXPECT(restore(pid, a, alen), -ENOENT);
	EXPECT(restore(pid, c, clen), -ENOENT);
	reap(pid);
out:
	free(buf);
	free(b_save);
	free(c_save);
	free(a_save);
	free(model);
	free(rec);
}

#define NTRACEES 4

/* Several tracees at once: the same address, a separate store each. */
static void several_tracees(void)
{
	struct record *rec = new_record(6);
	unsigned char *want = malloc(sizeof(*rec));
	pid_t pids[NTRACEES] = { 0 };
	char byte;
	int i;

	if (!check(rec && want, "malloc"))
		goto out;
	for (i = 0; i < NTRACEES; i++) {
		pids[i] = spawn_tracee();
		if (!check(pids[i] > 0, "tracee %d started", i))
			goto out;
	}
	for (i = 0; i < NTRACEES; i++) {
		check(tracee_fill(pids[i], rec, sizeof(*rec), 0x10 + i), "tracee %d filled", i);
		EXPECT(snap(pids[i], rec, sizeof(*rec)), 0);
	}
	EXPECT(snap(pids[0], rec->blob, 64), 0);
	EXPECT(getsnap(pids[1], rec->blob, &byte, 1), -ENOENT);
	for (i = 0; i < NTRACEES; i++)
		check(tracee_fill(pids[i], rec, sizeof(*rec), 0xff), "tracee %d overwritten", i);
	for (i = 0; i < NTRACEES; i++) {
		check(getsnap(pids[i], rec, &byte, 1) == (long)sizeof(*rec) && byte == 0x10 + i,
		      "tracee %d: GETSNAPSHOT has its own bytes (0x%02x)", i, (unsigned char)byte);
		EXPECT(restore(pids[i], rec, sizeof(*rec)), 0);
		memset(want, 0x10 + i, sizeof(*rec));
		tracee_equals(pids[i], rec, want, sizeof(*rec), "tracee restored to its own snapshot");
	}
	EXPECT(restore(pids[0], rec->blob, 64), 0);
out:
	for (i = 0; i < NTRACEES; i++)
		reap(pids[i]);
	free(want);
	free(rec);
}

/* A hole in the region: EIO at snapshot; a region unmapped after its snapshot: EIO at restore. */
static void unmapped_region(void)
{
	unsigned char *area = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct record *rec = new_record(7);
	unsigned char *one = NULL, *buf = malloc(3 * PG);
	pid_t pid = -1;

	if (!check(area != MAP_FAILED && rec && buf, "mmap and malloc"))
		goto out;
	pattern(area, 3 * PG, 7);
	munmap(area + PG, PG);	/* [area, area + 3 pages) now has a hole in the middle */
	one = malloc(3 * PG);	/* a heap region the tracee will unmap a page of */
	if (!check(one != NULL, "malloc"))
		goto out;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, area, 3 * PG), -EIO);
	EXPECT(snap(pid, area + PG, 1), -EIO);
	EXPECT(snap(pid, area + PG - 1, 2), -EIO);
	EXPECT(snap(pid, NULL, 16), -EIO);
	EXPECT(snap(pid, area, PG), 0);
	EXPECT(snap(pid, area, 3 * PG), -EIO);
	check(getsnap(pid, area, buf, 3 * PG) == (long)PG && !memcmp(buf, area, PG),
	      "the failed snapshot kept the old one (length and bytes)");
	EXPECT(restore(pid, area, PG), 0);

	/* Unmapped after the snapshot: a whole page inside the heap region. */
	{
		unsigned char *page = (unsigned char *)(((unsigned long)one + PG - 1) & ~(PG - 1));

		EXPECT(snap(pid, page, PG), 0);
		check(tracee_do(pid, CMD_UNMAP, page, PG, 0, 0) == 0, "the tracee unmapped the page");
		EXPECT(restore(pid, page, PG), -EIO);
		check(getsnap(pid, page, buf, PG) == (long)PG,
		      "the failed restore kept the snapshot");
		EXPECT(restore(pid, page, PG), -EIO);
	}
out:
	reap(pid);
	if (area != MAP_FAILED)
		munmap(area, 3 * PG);
	free(buf);
	free(one);
	free(rec);
}

/* mprotect(PROT_READ) before the snapshot: EIO; after it: EIO at restore, snapshot kept. */
static void readonly_region(void)
{
	unsigned char *mem = aligned_alloc(PG, 2 * PG);
	unsigned char *orig = malloc(2 * PG), *buf = malloc(2 * PG), *want = malloc(2 * PG);
	pid_t pid = -1;

	if (!check(mem && orig && buf && want, "aligned_alloc and malloc"))
		goto out;
	pattern(mem, 2 * PG, 8);
	memcpy(orig, mem, 2 * PG);
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	check(tracee_protect(pid, mem, 2 * PG, PROT_READ), "tracee: mprotect(PROT_READ)");
	EXPECT(snap(pid, mem, 2 * PG), -EIO);
	EXPECT(snap(pid, mem + 100, 10), -EIO);
	check(tracee_protect(pid, mem + PG, PG, PROT_READ | PROT_WRITE),
	      "tracee: second page writable again");
	EXPECT(snap(pid, mem, 2 * PG), -EIO);
	EXPECT(snap(pid, mem + PG - 1, 2), -EIO);
	EXPECT(snap(pid, mem + PG, PG), 0);
	EXPECT(restore(pid, mem + PG, PG), 0);

	check(tracee_protect(pid, mem, 2 * PG, PROT_READ | PROT_WRITE), "tracee: writable");
	EXPECT(snap(pid, mem, 2 * PG), 0);
	check(tracee_fill(pid, mem, 2 * PG, 0x77), "tracee filled the region with 0x77");
	check(tracee_protect(pid, mem + PG, PG, PROT_READ), "tracee: second page read-only");
	EXPECT(restore(pid, mem, 2 * PG), -EIO);
	memset(want, 0x77, 2 * PG);
	tracee_equals(pid, mem, want, 2 * PG, "the refused restore wrote nothing");
	check(getsnap(pid, mem, buf, 2 * PG) == (long)(2 * PG) && !memcmp(buf, orig, 2 * PG),
	      "the refused restore kept the snapshot");
	check(tracee_protect(pid, mem, 2 * PG, PROT_READ | PROT_WRITE), "tracee: writable again");
	EXPECT(restore(pid, mem, 2 * PG), 0);
	tracee_equals(pid, mem, orig, 2 * PG, "restore once writable again");
out:
	reap(pid);
	free(want);
	free(buf);
	free(orig);
	free(mem);
}

static int text_marker(int x)
{
	return x * 3 + 1;
}

static const char rodata_marker[] = "ptrace-snapshot: a read-only string in .rodata";

/* Program text (r-x) and .rodata are refused; a region made r-x after its snapshot too. */
static void text_region(void)
{
	unsigned char *mem = aligned_alloc(PG, PG);
	unsigned char *orig = malloc(PG);
	unsigned char buf[16];
	pid_t pid = -1;

	if (!check(mem && orig, "aligned_alloc") || !check(text_marker(1) == 4, "text reachable"))
		goto out;
	pattern(mem, PG, 9);
	memcpy(orig, mem, PG);
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, (const void *)text_marker, 64), -EIO);
	EXPECT(snap(pid, (const void *)main, 16), -EIO);
	EXPECT(snap(pid, rodata_marker, sizeof(rodata_marker)), -EIO);
	EXPECT(restore(pid, (const void *)text_marker, 64), -ENOENT);
	EXPECT(getsnap(pid, (const void *)text_marker, buf, sizeof(buf)), -ENOENT);

	EXPECT(snap(pid, mem, PG), 0);
	check(tracee_fill(pid, mem, PG, 0x66), "tracee overwrote the page");
	check(tracee_protect(pid, mem, PG, PROT_READ | PROT_EXEC), "tracee: mprotect(r-x)");
	EXPECT(restore(pid, mem, PG), -EIO);
	check(getsnap(pid, mem, buf, sizeof(buf)) == (long)PG, "snapshot kept");
	check(tracee_protect(pid, mem, PG, PROT_READ | PROT_WRITE), "tracee: rw- again");
	EXPECT(restore(pid, mem, PG), 0);
	tracee_equals(pid, mem, orig, PG, "restored once writable again");
out:
	reap(pid);
	free(orig);
	free(mem);
}

/* PTRACE_SNAPSHOT_MAX_LEN: exactly at the limit works, one byte more is E2BIG. */
static void len_limit(void)
{
	unsigned char *big = malloc(MAX_LEN + PG);
	unsigned char *orig = malloc(MAX_LEN), *buf = malloc(MAX_LEN + PG);
	pid_t pid = -1;

	if (!check(big && orig && buf, "malloc"))
		goto out;
	pattern(big, MAX_LEN + PG, 10);
	memcpy(orig, big, MAX_LEN);
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, big + 8, MAX_LEN + 1), -E2BIG);
	EXPECT(snap(pid, big, MAX_LEN), 0);
	EXPECT(snap(pid, big, MAX_LEN + 1), -E2BIG);
	check(getsnap(pid, big, buf, MAX_LEN + PG) == (long)MAX_LEN && !memcmp(buf, orig, MAX_LEN),
	      "the MAX_LEN snapshot is intact after the E2BIG replacement");
	check(tracee_fill(pid, big, MAX_LEN + PG, 0x99), "tracee overwrote the region");
	EXPECT(restore(pid, big, MAX_LEN + 1), -E2BIG);
	EXPECT(restore(pid, big, MAX_LEN), 0);
	tracee_equals(pid, big, orig, MAX_LEN, "1 MiB restored");
	EXPECT(snap(pid, big, ~0UL), -E2BIG);
out:
	reap(pid);
	free(buf);
	free(orig);
	free(big);
}

/* PTRACE_SNAPSHOT_MAX_TOTAL: exactly 4 MiB works, one byte more is ENOSPC. */
static void total_limit(void)
{
	unsigned char *big = malloc(MAX_LEN + 64);
	unsigned char byte;
	pid_t pid = -1, other = -1;
	int i;

	if (!check(big != NULL, "malloc"))
		goto out;
	pattern(big, MAX_LEN + 64, 11);
	pid = spawn_tracee();
	other = spawn_tracee();
	if (!check(pid > 0 && other > 0, "tracees started"))
		goto out;
	for (i = 0; i < 3; i++)
		check(snap(pid, big + i, MAX_LEN) == 0, "snapshot %d of 1 MiB at big+%d", i, i);
	EXPECT(snap(pid, big + 3, MAX_LEN - 1), 0);			/* 4 MiB - 1 */
	EXPECT(snap(pid, big + 4, 2), -ENOSPC);				/* 4 MiB + 1 */
	EXPECT(snap(pid, big + 4, 1), 0);				/* 4 MiB exactly */
	EXPECT(snap(pid, big + 5, 1), -ENOSPC);
	EXPECT(getsnap(pid, big + 5, &byte, 1), -ENOENT);
	EXPECT(snap(pid, big, MAX_LEN), 0);		/* a replacement is not counted twice */
	EXPECT(snap(pid, big + 3, MAX_LEN - 1), 0);
	EXPECT(snap(pid, big + 4, 2), -ENOSPC);		/* replacing 1 byte by 2 */
	check(getsnap(pid, big + 4, &byte, 1) == 1 && byte == big[4],
	      "the refused replacement kept the 1-byte snapshot");
	EXPECT(snap(pid, big + 4, 1), 0);
	EXPECT(snap(other, big, MAX_LEN), 0);		/* the limit is per tracee */
	EXPECT(restore(pid, big + 3, MAX_LEN - 1), 0);	/* 3 MiB + 1 left */
	EXPECT(snap(pid, big + 5, MAX_LEN - 1), 0);	/* 4 MiB exactly again */
	EXPECT(snap(pid, big + 6, 1), -ENOSPC);
	EXPECT(restore(pid, big + 4, 1), 0);
	EXPECT(snap(pid, big + 6, 1), 0);
out:
	reap(pid);
	reap(other);
	free(big);
}

/* Argument errors: EINVAL, E2BIG, ENOENT, EFAULT, and the state stays empty. */
static void bad_arguments(void)
{
	struct record *rec = new_record(12);
	struct ptrace_snapshot_buf sb;
	unsigned char buf[64], unaligned[sizeof(sb) + 1];
	pid_t pid = -1;

	if (!check(rec != NULL, "malloc"))
		goto out;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, rec, 0), -EINVAL);
	EXPECT(restore(pid, rec, 0), -EINVAL);
	EXPECT(snap(pid, (void *)(~0UL - 15), 32), -EINVAL);		/* start + len overflows */
	EXPECT(restore(pid, (void *)(~0UL - 15), 32), -EINVAL);
	EXPECT(snap(pid, (void *)(1UL << 63), 16), -EINVAL);		/* beyond TASK_SIZE */
	EXPECT(snap(pid, (void *)0xffffffff81000000UL, 16), -EINVAL);	/* kernel text */
	EXPECT(restore(pid, (void *)(1UL << 63), 16), -EINVAL);
	EXPECT(snap(pid, rec, ~0UL), -E2BIG);
	EXPECT(restore(pid, rec, sizeof(*rec)), -ENOENT);
	EXPECT(getsnap(pid, rec, buf, sizeof(buf)), -ENOENT);
	EXPECT(pt(PTRACE_GETSNAPSHOT, pid, (unsigned long)rec, 0), -EFAULT);
	EXPECT(pt(PTRACE_GETSNAPSHOT, pid, (unsigned long)rec, 0xffffffff81000000UL), -EFAULT);
	EXPECT(snap(pid, rec, sizeof(*rec)), 0);
	EXPECT(restore(pid, rec, sizeof(*rec) - 1), -EINVAL);
	EXPECT(restore(pid, rec, sizeof(*rec) + 1), -EINVAL);
	EXPECT(getsnap(pid, rec, NULL, 16), -EFAULT);
	EXPECT(getsnap(pid, rec, (void *)0xffffffff81000000UL, 16), -EFAULT);
	EXPECT(getsnap(pid, rec, (void *)16, 16), -EFAULT);
	sb.buf = (unsigned long)buf;
	sb.len = sizeof(buf);
	EXPECT(pt(PTRACE_GETSNAPSHOT, pid, (unsigned long)rec, (unsigned long)&sb),
	       (long)sizeof(*rec));
	memcpy(unaligned + 1, &sb, sizeof(sb));
	EXPECT(pt(PTRACE_GETSNAPSHOT, pid, (unsigned long)rec, (unsigned long)(unaligned + 1)),
	       (long)sizeof(*rec));	/* an unaligned struct is fine */
	EXPECT(pt(0x4243, pid, (unsigned long)rec, sizeof(*rec)), -EIO);	/* next number */
	EXPECT(restore(pid, rec, sizeof(*rec)), 0);
	EXPECT(getsnap(pid, rec, buf, sizeof(buf)), -ENOENT);
out:
	reap(pid);
	free(rec);
}

struct thread_call {
	pid_t pid;
	const void *addr;
	unsigned long len;
	long ret[3];
};

static void *call_from_thread(void *arg)
{
	struct thread_call *tc = arg;
	unsigned char buf[16];

	tc->ret[0] = snap(tc->pid, tc->addr, tc->len);
	tc->ret[1] = restore(tc->pid, tc->addr, tc->len);
	tc->ret[2] = getsnap(tc->pid, tc->addr, buf, sizeof(buf));
	return NULL;
}

/* Only the tracer: another process and another thread of the tracer get ESRCH. */
static void non_tracer(void)
{
	struct record *rec = new_record(13);
	struct thread_call tc;
	pthread_t thread;
	long rets[3];
	int pipefd[2], status, i;
	pid_t pid = -1, helper;

	if (!check(rec != NULL && pipe(pipefd) == 0, "malloc and pipe"))
		goto out;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(snap(pid, rec, sizeof(*rec)), 0);

	helper = fork();
	if (helper == 0) {
		unsigned char buf[16];

		rets[0] = snap(pid, rec, sizeof(*rec));
		rets[1] = restore(pid, rec, sizeof(*rec));
		rets[2] = getsnap(pid, rec, buf, sizeof(buf));
		_exit(write(pipefd[1], rets, sizeof(rets)) == sizeof(rets) ? 0 : 1);
	}
	close(pipefd[1]);
	if (check(helper > 0 && read(pipefd[0], rets, sizeof(rets)) == sizeof(rets),
		  "a second process made the three requests")) {
		for (i = 0; i < 3; i++)
			check(rets[i] == -ESRCH || rets[i] == -EPERM,
			      "other process: request 0x%x -> %s (expected ESRCH/EPERM)",
			      PTRACE_SNAPSHOT + i, errname(rets[i]));
	}
	if (helper > 0)
		waitpid(helper, &status, 0);
	close(pipefd[0]);

	tc.pid = pid;
	tc.addr = rec;
	tc.len = sizeof(*rec);
	if (check(pthread_create(&thread, NULL, call_from_thread, &tc) == 0,
		  "a second thread of the tracer started")) {
		pthread_join(thread, NULL);
		for (i = 0; i < 3; i++)
			check(tc.ret[i] == -ESRCH,
			      "other thread: request 0x%x -> %s (expected ESRCH)",
			      PTRACE_SNAPSHOT + i, errname(tc.ret[i]));
	}
	check(getsnap(pid, rec, NULL, 0) == (long)sizeof(*rec),
	      "the tracer's snapshot is untouched by the refused requests");
	EXPECT(restore(pid, rec, sizeof(*rec)), 0);
out:
	reap(pid);
	free(rec);
}

static void __attribute__((noreturn)) pause_forever(void)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	for (;;)
		pause();
}

/* A traced but running tracee is refused (ESRCH); once stopped it is served. */
static void running_tracee(void)
{
	struct record *rec = new_record(14);
	unsigned char buf[16];
	pid_t pid;

	if (!check(rec != NULL, "malloc"))
		return;
	pid = fork();
	if (pid == 0)
		pause_forever();
	if (!check(pid > 0, "child started"))
		goto out;
	EXPECT(snap(pid, rec, sizeof(*rec)), -ESRCH);		/* not traced at all */
	EXPECT(pt(PTRACE_SEIZE, pid, 0, PTRACE_O_EXITKILL), 0);
	EXPECT(snap(pid, rec, sizeof(*rec)), -ESRCH);		/* traced, running */
	EXPECT(getsnap(pid, rec, buf, sizeof(buf)), -ESRCH);
	EXPECT(restore(pid, rec, sizeof(*rec)), -ESRCH);
	EXPECT(pt(PTRACE_INTERRUPT, pid, 0, 0), 0);
	check(wait_stopped(pid), "tracee stopped by PTRACE_INTERRUPT");
	EXPECT(snap(pid, rec, sizeof(*rec)), 0);
	EXPECT(pt(PTRACE_CONT, pid, 0, 0), 0);
	usleep(20000);
	EXPECT(getsnap(pid, rec, buf, sizeof(buf)), -ESRCH);	/* running again */
	EXPECT(restore(pid, rec, sizeof(*rec)), -ESRCH);
	EXPECT(pt(PTRACE_INTERRUPT, pid, 0, 0), 0);
	check(wait_stopped(pid), "tracee stopped again");
	EXPECT(restore(pid, rec, sizeof(*rec)), 0);
out:
	reap(pid);
	free(rec);
}

/* Fill each tracee's quota (4 snapshots of 1 MiB of one malloc()ed region). */
static bool fill_quota(pid_t pid, const unsigned char *big)
{
	bool ok = true;
	int i;

	for (i = 0; i < 4; i++)
		ok &= snap(pid, big + i, MAX_LEN) == 0;
	return ok;
}

/* Wait up to 5 s for MemFree to climb back to at least floor kB. */
static long wait_memfree(long floor)
{
	long now = meminfo_kb("MemFree");
	int i;

	for (i = 0; i < 50 && now < floor; i++) {
		usleep(100000);
		now = meminfo_kb("MemFree");
	}
	return now;
}

static void check_memory_back(long before, long during, long after, const char *how)
{
	long taken = before - during, back = after - during;

	note("MemFree: %ld kB before, %ld kB with the snapshots, %ld kB after %s", before, during,
	     after, how);
	/*
	 * MemFree also moves with the page cache and kmemleak's own objects while the snapshots are
	 * taken (12.5 MiB was seen once for 16 MiB): half of them is enough to show they were charged.
	 */
	check(taken >= 8 * 1024, "the 16 MiB of snapshots took %ld kB", taken);
	check(back >= taken / 2, "%ld of those kB came back after %s", back, how);
}

/* PTRACE_DETACH frees the tracee's snapshots: memory back, quota reset, nothing to restore. */
static void freed_on_detach(void)
{
	unsigned char *big = malloc(MAX_LEN + 64);
	pid_t pids[NTRACEES] = { 0 };
	long before, during, after;
	unsigned char byte;
	int i;

	if (!check(big != NULL, "malloc"))
		goto out;
	pattern(big, MAX_LEN + 64, 15);
	for (i = 0; i < NTRACEES; i++) {
		pids[i] = spawn_tracee();
		if (!check(pids[i] > 0, "tracee %d started", i))
			goto out;
	}
	before = meminfo_kb("MemFree");
	for (i = 0; i < NTRACEES; i++)
		check(fill_quota(pids[i], big), "tracee %d: 4 MiB of snapshots", i);
	during = meminfo_kb("MemFree");
	for (i = 0; i < NTRACEES; i++)
		EXPECT(pt(PTRACE_DETACH, pids[i], 0, 0), 0);
	after = wait_memfree(during + (before - during) / 2);
	check_memory_back(before, during, after, "PTRACE_DETACH");

	for (i = 0; i < NTRACEES; i++) {
		EXPECT(pt(PTRACE_SEIZE, pids[i], 0, PTRACE_O_EXITKILL), 0);
		EXPECT(pt(PTRACE_INTERRUPT, pids[i], 0, 0), 0);
		check(wait_stopped(pids[i]), "tracee %d attached again and stopped", i);
		EXPECT(getsnap(pids[i], big, &byte, 1), -ENOENT);
		EXPECT(restore(pids[i], big, MAX_LEN), -ENOENT);
		check(fill_quota(pids[i], big), "tracee %d: the full 4 MiB quota again", i);
		EXPECT(snap(pids[i], big + 5, 1), -ENOSPC);
	}
out:
	for (i = 0; i < NTRACEES; i++)
		reap(pids[i]);
	free(big);
}

/*
 * A tracer that exits without detaching: exit_ptrace() frees what it left. It reports its
 * tracees on @report and exits once @go is closed (after the suite has measured MemFree).
 */
static void tracer_exits(const unsigned char *big, int report, int go)
{
	char byte;
	pid_t pids[NTRACEES];
	bool ok = true;
	int i;

	for (i = 0; i < NTRACEES; i++) {
		pids[i] = fork();
		if (pids[i] == 0) {
			/* No PDEATHSIG: the tracee outlives this tracer, reparented to the suite. */
			if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) < 0)
				_exit(100);
			for (;;)
				raise(SIGSTOP);
		}
		ok &= pids[i] > 0 && wait_stopped(pids[i]);
	}
	for (i = 0; ok && i < NTRACEES; i++)
		ok &= fill_quota(pids[i], big);
	ok &= write(report, pids, sizeof(pids)) == sizeof(pids);
	ok &= read(go, &byte, 1) == 0;
	_exit(ok ? 0 : 1);
}

/* The tracee exits (on its own or killed) or the tracer exits: the snapshots are freed. */
static void freed_on_exit(void)
{
	unsigned char *big = malloc(MAX_LEN + 64);
	pid_t pids[NTRACEES] = { 0 }, orphans[NTRACEES] = { 0 }, tracer;
	long before, during, after;
	int i, status, pipefd[2], go[2];
	unsigned char byte;

	if (!check(big != NULL && pipe(pipefd) == 0 && pipe(go) == 0, "malloc and pipes"))
		goto out;
	pattern(big, MAX_LEN + 64, 16);
	for (i = 0; i < NTRACEES; i++) {
		pids[i] = spawn_tracee();
		if (!check(pids[i] > 0, "tracee %d started", i))
			goto out;
	}
	before = meminfo_kb("MemFree");
	for (i = 0; i < NTRACEES; i++)
		check(fill_quota(pids[i], big), "tracee %d: 4 MiB of snapshots", i);
	during = meminfo_kb("MemFree");
	for (i = 0; i < NTRACEES; i++) {
		if (i % 2 || !check(tracee_do(pids[i], CMD_EXIT, NULL, 0, 0, 0) == 0,
				    "tracee %d told to _exit(0)", i))
			kill(pids[i], SIGKILL);
		check(waitpid(pids[i], &status, __WALL) == pids[i] &&
		      (i % 2 ? WIFSIGNALED(status) : WIFEXITED(status)),
		      "tracee %d %s and was reaped", i, i % 2 ? "killed" : "exited");
		pids[i] = 0;
	}
	after = wait_memfree(during + (before - during) / 2);
	check_memory_back(before, during, after, "the tracees exited");

	/* The tracer exits: its tracees live on (the suite is their subreaper). */
	before = meminfo_kb("MemFree");
	tracer = fork();
	if (tracer == 0) {
		close(go[1]);
		tracer_exits(big, pipefd[1], go[0]);
	}
	close(pipefd[1]);
	close(go[0]);
	if (!check(tracer > 0 && read(pipefd[0], orphans, sizeof(orphans)) == sizeof(orphans),
		   "a tracer process started 4 tracees"))
		goto out_pipe;
	during = meminfo_kb("MemFree");
	close(go[1]);
	go[1] = -1;
	waitpid(tracer, &status, 0);
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the tracer exited without detaching");
	after = wait_memfree(during + (before - during) / 2);
	check_memory_back(before, during, after, "the tracer exited");
	for (i = 0; i < NTRACEES; i++) {
		if (orphans[i] <= 0)
			continue;
		EXPECT(pt(PTRACE_SEIZE, orphans[i], 0, PTRACE_O_EXITKILL), 0);
		EXPECT(pt(PTRACE_INTERRUPT, orphans[i], 0, 0), 0);
		if (wait_stopped(orphans[i]))
			EXPECT(getsnap(orphans[i], big, &byte, 1), -ENOENT);
	}
out_pipe:
	close(pipefd[0]);
	if (go[1] >= 0)
		close(go[1]);
out:
	for (i = 0; i < NTRACEES; i++) {
		reap(pids[i]);
		reap(orphans[i]);
	}
	free(big);
}

/* A tracee that exec()s: its snapshots describe an address space that is gone. */
static void dropped_on_exec(void)
{
	unsigned char *big = malloc(MAX_LEN + 64);
	struct command c = { .op = CMD_EXEC };
	pid_t pid = -1, waited;
	int status = 0;

	if (!check(big != NULL, "malloc"))
		goto out;
	pattern(big, MAX_LEN + 64, 17);
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;
	EXPECT(pt(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL | PTRACE_O_TRACEEXEC), 0);
	check(fill_quota(pid, big), "4 MiB of snapshots");
	EXPECT(snap(pid, big + 5, 1), -ENOSPC);
	if (!check(vm_write(pid, &cmd, &c, sizeof(c)) && pt(PTRACE_CONT, pid, 0, SIGUSR1) == 0,
		   "tracee told to exec itself"))
		goto out;
	waited = waitpid(pid, &status, __WALL);
	check(waited == pid && WIFSTOPPED(status) &&
	      status >> 8 == (SIGTRAP | (PTRACE_EVENT_EXEC << 8)),
	      "PTRACE_EVENT_EXEC stop (status 0x%x)", status);
	EXPECT(getsnap(pid, big, NULL, 0), -ENOENT);
	EXPECT(restore(pid, big + 1, MAX_LEN), -ENOENT);
	EXPECT(pt(PTRACE_CONT, pid, 0, 0), 0);
	check(wait_stopped(pid), "the new program stopped itself");
	EXPECT(getsnap(pid, big + 2, NULL, 0), -ENOENT);
	EXPECT(snap(pid, (void *)main, 16), -EIO);	/* the new image's text */
out:
	reap(pid);
	free(big);
}

/* ---------------------------------------------------------------- concurrency */

struct worker {
	int index;
	unsigned int seed;
	pid_t pid;		/* shared_mm: the tracee thread this worker traces */
	unsigned char *region;	/* shared_mm: this worker's part of the shared region */
	size_t len;
	int rounds;
	int errors;
};

static unsigned int rnd(unsigned int *seed)
{
	*seed = *seed * 1103515245 + 12345;
	return (*seed >> 16) & 0x7fff;
}

/* Tracer threads, each with its own tracee, snapshot, change, read back and restore at once. */
static void *tracer_thread(void *arg)
{
	struct worker *w = arg;
	size_t len = 2 * PG + 100;
	unsigned char *region = malloc(len), *buf = malloc(len), *want = malloc(len);
	pid_t pid = -1;
	int r;

	if (!region || !buf || !want) {
		w->errors++;
		goto out;
	}
	pattern(region, len, 20 + w->index);
	pid = spawn_tracee();
	if (pid <= 0) {
		w->errors++;
		goto out;
	}
	for (r = 0; r < w->rounds; r++) {
		size_t off = rnd(&w->seed) % 64, n = 1 + rnd(&w->seed) % (len - off);
		int byte = rnd(&w->seed) & 0xff;

		/* want: the tracee's bytes when the snapshot is taken */
		if (!vm_read(pid, region, want, len) || snap(pid, region + off, n) != 0 ||
		    !tracee_fill(pid, region, len, byte) ||
		    getsnap(pid, region + off, buf, len) != (long)n ||
		    memcmp(buf, want + off, n) || restore(pid, region + off, n) != 0) {
			note("tracer thread %d: round %d: a request failed", w->index, r);
			w->errors++;
			break;
		}
		if (!vm_read(pid, region, buf, len) || memcmp(buf + off, want + off, n) ||
		    !all_bytes(buf, off, byte) || !all_bytes(buf + off + n, len - off - n, byte)) {
			note("tracer thread %d: round %d: wrong bytes after restore", w->index, r);
			w->errors++;
			break;
		}
	}
out:
	reap(pid);
	free(want);
	free(buf);
	free(region);
	return NULL;
}

#define NWORKERS 4

static void concurrent_tracees(void)
{
	struct worker w[NWORKERS];
	pthread_t threads[NWORKERS];
	bool started[NWORKERS];
	int i;

	for (i = 0; i < NWORKERS; i++) {
		memset(&w[i], 0, sizeof(w[i]));
		w[i].index = i;
		w[i].seed = 1000 + i;
		w[i].rounds = 100;
		started[i] = pthread_create(&threads[i], NULL, tracer_thread, &w[i]) == 0;
		check(started[i], "tracer thread %d started", i);
	}
	for (i = 0; i < NWORKERS; i++) {
		if (!started[i])
			continue;
		pthread_join(threads[i], NULL);
		check(w[i].errors == 0, "tracer thread %d: %d rounds of snapshot/change/get/restore, "
		      "%d errors", i, w[i].rounds, w[i].errors);
	}
}

/* The threads of one tracee process, each traced by its own tracer thread: one mm, 4 stores. */
struct shared_area {
	volatile pid_t tids[NWORKERS];
	volatile int ready;
};

static void *tracee_thread(void *arg)
{
	struct shared_area *sa = arg;
	int i = __atomic_fetch_add(&sa->ready, 1, __ATOMIC_SEQ_CST);

	sa->tids[i] = gettid();
	for (;;)
		pause();
	return NULL;
}

static void *shared_mm_worker(void *arg)
{
	struct worker *w = arg;
	unsigned char *buf = malloc(w->len), *mine = malloc(w->len);
	/* all the parts, overlapping every worker's own snapshot, at a start of its own */
	unsigned char *whole = w->region - w->index * w->len + 1;
	int r;

	if (!buf || !mine || pt(PTRACE_SEIZE, w->pid, 0, PTRACE_O_EXITKILL) ||
	    pt(PTRACE_INTERRUPT, w->pid, 0, 0) || !wait_stopped(w->pid)) {
		note("worker %d: cannot attach to thread %d: %s", w->index, w->pid, strerror(errno));
		w->errors++;
		goto out;
	}
	for (r = 0; r < w->rounds; r++) {
		int byte = rnd(&w->seed) & 0xff;
		long got;

		memset(mine, byte, w->len);
		if (!vm_write(w->pid, w->region, mine, w->len) ||
		    snap(w->pid, w->region, w->len) != 0 ||
		    snap(w->pid, whole, NWORKERS * w->len - 1) != 0) {
			w->errors++;
			note("worker %d: round %d: snapshot failed", w->index, r);
			break;
		}
		memset(buf, byte ^ 0xff, w->len);
		if (!vm_write(w->pid, w->region, buf, w->len) ||
		    restore(w->pid, w->region, w->len) != 0 ||
		    !vm_read(w->pid, w->region, buf, w->len) || memcmp(buf, mine, w->len)) {
			w->errors++;
			note("worker %d: round %d: restore did not bring back its bytes", w->index, r);
			break;
		}
		got = getsnap(w->pid, whole, buf, w->len);
		if (got != (long)(NWORKERS * w->len - 1)) {
			w->errors++;
			note("worker %d: round %d: GETSNAPSHOT -> %s", w->index, r, errname(got));
			break;
		}
		if (w->index > 0 && getsnap(w->pid, w->region - w->len, buf, 1) != -ENOENT) {
			w->errors++;
			note("worker %d: another thread's snapshot is visible", w->index);
			break;
		}
	}
	pt(PTRACE_DETACH, w->pid, 0, 0);
out:
	free(mine);
	free(buf);
	return NULL;
}

static void shared_mm_threads(void)
{
	size_t part = PG;
	unsigned char *region = malloc(NWORKERS * part);
	struct shared_area *sa = mmap(NULL, sizeof(*sa), PROT_READ | PROT_WRITE,
				      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct worker w[NWORKERS];
	pthread_t threads[NWORKERS];
	bool started[NWORKERS];
	pid_t child = -1;
	int i, waited;

	if (!check(region && sa != MAP_FAILED, "malloc and a shared page"))
		goto out;
	memset((void *)sa, 0, sizeof(*sa));
	child = fork();
	if (child == 0) {
		pthread_t t;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		for (i = 1; i < NWORKERS; i++)
			pthread_create(&t, NULL, tracee_thread, sa);
		tracee_thread(sa);
	}
	for (waited = 0; sa->ready < NWORKERS && waited < 500; waited++)
		usleep(10000);
	if (!check(child > 0 && sa->ready == NWORKERS, "tracee process with %d threads", NWORKERS))
		goto out;
	for (i = 0; i < NWORKERS; i++) {
		memset(&w[i], 0, sizeof(w[i]));
		w[i].index = i;
		w[i].seed = 2000 + i;
		w[i].pid = sa->tids[i];
		w[i].region = region + i * part;
		w[i].len = part;
		w[i].rounds = 60;
	}
	for (i = 0; i < NWORKERS; i++) {
		started[i] = pthread_create(&threads[i], NULL, shared_mm_worker, &w[i]) == 0;
		check(started[i], "tracer thread %d started on tracee thread %d", i, w[i].pid);
	}
	for (i = 0; i < NWORKERS; i++) {
		if (!started[i])
			continue;
		pthread_join(threads[i], NULL);
		check(w[i].errors == 0, "tracer thread %d: %d rounds, %d errors", i, w[i].rounds,
		      w[i].errors);
	}
out:
	reap(child);
	if (sa != MAP_FAILED)
		munmap(sa, sizeof(*sa));
	free(region);
}

struct killer {
	pid_t pid;
	unsigned int delay_us;
};

static void *killer_thread(void *arg)
{
	struct killer *k = arg;

	usleep(k->delay_us);
	kill(k->pid, SIGKILL);
	return NULL;
}

/*
 * SIGKILL to the tracee while its tracer is in the middle of 1 MiB requests, then to a tracer
 * in the middle of its requests: only success or ESRCH, no warning, nothing leaked (see kmemleak).
 */
static void killed_mid_request(void)
{
	unsigned char *big = malloc(MAX_LEN), *buf = malloc(MAX_LEN);
	unsigned int seed = 77;
	int round, status;

	if (!check(big && buf, "malloc"))
		goto out;
	pattern(big, MAX_LEN, 21);
	for (round = 0; round < 6; round++) {
		struct killer k;
		pthread_t killer;
		long ret = 0, unexpected = 0, calls = 0;
		pid_t pid = spawn_tracee();

		if (!check(pid > 0, "round %d: tracee started", round))
			break;
		k.pid = pid;
		k.delay_us = 2000 + rnd(&seed) % 30000;
		if (pthread_create(&killer, NULL, killer_thread, &k)) {
			reap(pid);
			check(false, "killer thread");
			break;
		}
		while (ret != -ESRCH && calls < 100000) {
			switch (calls++ % 3) {
			case 0:
				ret = snap(pid, big, MAX_LEN);
				break;
			case 1:
				ret = getsnap(pid, big, buf, MAX_LEN);
				ret = ret == (long)MAX_LEN ? 0 : ret;
				break;
			case 2:
				ret = restore(pid, big, MAX_LEN);
				break;
			}
			if (ret && ret != -ESRCH && ret != -ENOENT)
				unexpected = ret;
		}
		pthread_join(killer, NULL);
		check(unexpected == 0 && ret == -ESRCH,
		      "round %d: killed after %u us, %ld requests, last %s, unexpected %s", round,
		      k.delay_us, calls, errname(ret), errname(unexpected));
		check(waitpid(pid, &status, __WALL) == pid && WIFSIGNALED(status),
		      "round %d: the killed tracee was reaped", round);
	}

	/*
	 * Kill a tracer mid-request: its tracees die with it (PTRACE_O_EXITKILL). Mid-request,
	 * not mid-set-up: a tracer killed before spawn_tracee() has set PTRACE_O_EXITKILL leaves
	 * a tracee that nothing kills (under load the set-up can outlast the shortest delay), so
	 * the tracer says when its tracee is set up, and the delay starts then.
	 */
	for (round = 0; round < 4; round++) {
		int ready[2];
		pid_t tracer;
		char c;

		if (!check(pipe(ready) == 0, "tracer %d: pipe", round))
			break;
		tracer = fork();
		if (!check(tracer >= 0, "tracer %d: fork", round)) {
			close(ready[0]);
			close(ready[1]);
			break;
		}
		if (tracer == 0) {
			pid_t pid = spawn_tracee();

			close(ready[0]);
			if (write(ready[1], "r", 1) != 1)
				_exit(1);
			for (;;) {
				snap(pid, big, MAX_LEN);
				restore(pid, big, MAX_LEN);
			}
		}
		close(ready[1]);
		check(read(ready[0], &c, 1) == 1, "tracer %d set its tracee up", round);
		close(ready[0]);
		usleep(5000 + rnd(&seed) % 40000);
		kill(tracer, SIGKILL);
		check(waitpid(tracer, &status, 0) == tracer && WIFSIGNALED(status),
		      "tracer %d killed mid-request", round);
	}
	/* Their tracees, killed by PTRACE_O_EXITKILL, come to the suite (subreaper): reap them. */
	for (round = 0; round < 50; round++) {
		pid_t gone = waitpid(-1, &status, __WALL | WNOHANG);

		if (gone < 0)
			break;
		if (gone == 0)
			usleep(100000);
	}
	check(round < 50, "the dead tracers' tracees were reaped");
out:
	free(buf);
	free(big);
}

/* ---------------------------------------------------------------- random run */

#define ARENA_PAGES	16
#define ARENA		(ARENA_PAGES * PG)
#define MODEL_MAX	1024
#define RANDOM_OPS	3000

struct model_snap {
	unsigned long start, len;
	unsigned char *data;
};

static struct model_snap model[MODEL_MAX];
static int model_count;
static unsigned long model_total;

static struct model_snap *model_find(unsigned long start)
{
	int i;

	for (i = 0; i < model_count; i++)
		if (model[i].start == start)
			return &model[i];
	return NULL;
}

static void model_drop(struct model_snap *m)
{
	model_total -= m->len;
	free(m->data);
	*m = model[--model_count];
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/*
 * Random requests with random (and hostile) arguments against one tracee, checked against a
 * model of what the kernel must answer and of the tracee's memory: an arena of 16 writable
 * pages between PROT_NONE guard pages, a read-only page, the program text, the null page,
 * addresses past TASK_SIZE, lengths 0 / huge / overflowing, bad buffer pointers.
 */
static void random_arguments(void)
{
	unsigned char *guarded = mmap(NULL, ARENA + 2 * PG, PROT_NONE,
				      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *ro = mmap(NULL, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *arena, *mirror = malloc(ARENA), *buf = malloc(ARENA + 2 * PG);
	unsigned long counts[4] = { 0 }, gen = 0;
	const char *env = getenv("PTRACE_SNAPSHOT_SEED");
	uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL) ^ 0x9e3779b97f4a7c15ULL;
	int i, bad = 0;
	pid_t pid = -1;

	model_count = 0;
	model_total = 0;
	if (!check(guarded != MAP_FAILED && ro != MAP_FAILED && mirror && buf, "arena set up"))
		goto out;
	arena = guarded + PG;
	if (!check(mprotect(arena, ARENA, PROT_READ | PROT_WRITE) == 0, "arena writable"))
		goto out;
	pattern(arena, ARENA, 22);
	memcpy(mirror, arena, ARENA);
	note("seed 0x%llx (PTRACE_SNAPSHOT_SEED to repeat), %d operations", (unsigned long long)seed,
	     RANDOM_OPS);
	seed = seed ? seed : 1;
	pid = spawn_tracee();
	if (!check(pid > 0, "tracee started"))
		goto out;

	for (i = 0; i < RANDOM_OPS && bad < 5; i++) {
		uint64_t r = xorshift(&seed);
		unsigned int op = r % 10, how = (r >> 8) % 100;
		unsigned long start, len, end;
		struct model_snap *m;
		long want, got;
		bool inside;

		/* start */
		if (how < 75)
			start = (unsigned long)arena - PG + xorshift(&seed) % (ARENA + 2 * PG);
		else if (how < 85 && model_count)
			start = model[xorshift(&seed) % model_count].start;
		else if (how < 88)
			start = xorshift(&seed) % 65536;		/* below mmap_min_addr */
		else if (how < 91)
			start = (unsigned long)ro + xorshift(&seed) % PG;
		else if (how < 94)
			start = (unsigned long)text_marker + xorshift(&seed) % 256;
		else
			start = (1UL << 63) | xorshift(&seed);	/* past TASK_SIZE */
		if (start >= (unsigned long)arena - PG && start < (unsigned long)arena + ARENA + PG &&
		    how < 75 && (r >> 20) % 4 == 0)
			start = (unsigned long)arena + ((start - (unsigned long)arena) & ~7UL);

		/* length */
		how = (r >> 32) % 100;
		m = model_find(start);
		if (how < 70)
			len = 1 + xorshift(&seed) % (how < 35 ? 256 : ARENA + PG);
		else if (how < 80 && m)
			len = m->len;
		else if (how < 84)
			len = 0;
		else if (how < 88)
			len = MAX_LEN;
		else if (how < 91)
			len = MAX_LEN + 1;
		else if (how < 94)
			len = ~0UL - xorshift(&seed) % 16;
		else if (how < 97)
			len = -start;				/* start + len wraps to 0 */
		else
			len = 1 + xorshift(&seed) % MAX_LEN;
		end = start + len;
		inside = start >= (unsigned long)arena && end >= start &&
			 end <= (unsigned long)arena + ARENA;

		if (op < 4) {			/* PTRACE_SNAPSHOT */
			unsigned long total = model_total - (m ? m->len : 0);

			if (!len)
				want = -EINVAL;
			else if (len > MAX_LEN)
				want = -E2BIG;
			else if (end < start || start >= (1UL << 62))
				want = -EINVAL;
			else if (total + len > MAX_TOTAL)
				want = -ENOSPC;
			else if (!m && (unsigned long)model_count >= PTRACE_SNAPSHOT_MAX_COUNT)
				want = -ENOSPC;
			else if (!inside)
				want = -EIO;
			else
				want = 0;
			got = snap(pid, (void *)start, len);
			if (got == 0 && want == 0) {
				unsigned char *copy = malloc(len);

				memcpy(copy, mirror + (start - (unsigned long)arena), len);
				if (m) {
					model_total -= m->len;
					free(m->data);
				} else if (model_count < MODEL_MAX) {
					m = &model[model_count++];
				} else {
					note("model full");
					bad++;
					free(copy);
					continue;
				}
				m->start = start;
				m->len = len;
				m->data = copy;
				model_total += len;
			}
		} else if (op < 6) {		/* PTRACE_RESTORE */
			if (!len)
				want = -EINVAL;
			else if (len > MAX_LEN)
				want = -E2BIG;
			else if (end < start || start >= (1UL << 62))
				want = -EINVAL;
			else if (!m)
				want = -ENOENT;
			else if (m->len != len)
				want = -EINVAL;
			else
				want = 0;
			got = restore(pid, (void *)start, len);
			if (got == 0 && want == 0) {
				memcpy(mirror + (start - (unsigned long)arena), m->data, len);
				model_drop(m);
			}
		} else if (op < 8) {		/* PTRACE_GETSNAPSHOT */
			struct ptrace_snapshot_buf sb;
			unsigned long sbp = (unsigned long)&sb, blen;
			unsigned int kind = xorshift(&seed) % 100;

			blen = xorshift(&seed) % 3 ? xorshift(&seed) % (ARENA + 2 * PG) : 0;
			sb.buf = (unsigned long)buf;
			sb.len = blen;
			if (kind < 4)
				sbp = 0;
			else if (kind < 7)
				sbp = 0xffffffff81000000UL;
			else if (kind < 10)
				sb.buf = 0;
			else if (kind < 13)
				sb.buf = 0xffff888000000000UL;
			if (sbp != (unsigned long)&sb)
				want = -EFAULT;
			else if (!m)
				want = -ENOENT;
			else if (sb.buf != (unsigned long)buf && (blen < m->len ? blen : m->len))
				want = -EFAULT;
			else
				want = m->len;
			memset(buf, 0xcd, ARENA + 2 * PG);
			got = pt(PTRACE_GETSNAPSHOT, pid, start, sbp);
			if (got == want && want > 0 && sb.buf == (unsigned long)buf) {
				unsigned long n = blen < m->len ? blen : m->len;

				if (memcmp(buf, m->data, n) ||
				    !all_bytes(buf + n, ARENA + 2 * PG - n, 0xcd)) {
					note("op %d: GETSNAPSHOT(0x%lx) copied the wrong bytes", i,
					     start);
					bad++;
				}
			}
		} else if (op < 9) {		/* the tracee changes its arena */
			gen++;
			want = 0;
			got = tracee_do(pid, CMD_MUTATE, arena, ARENA, 0, gen);
			mutate(mirror, ARENA, gen);
		} else {			/* an unknown request next to ours */
			want = -EIO;
			got = pt(0x4243 + (r >> 40) % 4, pid, start, len);
		}
		if (op < 8)
			counts[got == 0 || got > 0 ? 0 : got == want ? 1 : 2]++;
		if (got != want) {
			note("op %d: request %u start 0x%lx len 0x%lx -> %s, expected %s", i, op, start,
			     len, errname(got), errname(want));
			bad++;
		}
	}
	check(bad == 0, "%d operations as the model predicted (%lu succeeded, %lu expected errors)",
	      i, counts[0], counts[1]);
	tracee_equals(pid, arena, mirror, ARENA, "the tracee's arena equals the model");
	for (i = 0; i < model_count; i++) {
		long got = getsnap(pid, (void *)model[i].start, buf, ARENA + 2 * PG);

		if (got != (long)model[i].len || memcmp(buf, model[i].data, model[i].len)) {
			check(false, "snapshot at 0x%lx: %s", model[i].start, errname(got));
			break;
		}
	}
	check(i == model_count, "the %d snapshots left (%lu bytes) match the model", model_count,
	      model_total);
out:
	reap(pid);
	while (model_count)
		model_drop(&model[0]);
	if (guarded != MAP_FAILED)
		munmap(guarded, ARENA + 2 * PG);
	if (ro != MAP_FAILED)
		munmap(ro, PG);
	free(buf);
	free(mirror);
}

/* --------------------------------------------------------------- kmemleak */

#define KMEMLEAK "/sys/kernel/debug/kmemleak"

static bool write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	bool ok;

	if (fd < 0)
		return false;
	ok = write(fd, text, strlen(text)) == (ssize_t)strlen(text);
	close(fd);
	return ok;
}

/* Print one kmemleak report (its lines in block) if its backtrace has snapshot code. */
static bool kmemleak_ours(char *block, int *printed)
{
	char *save, *l;

	if (!strstr(block, "snapshot"))
		return false;
	for (l = strtok_r(block, "\n", &save); l && *printed < 40; l = strtok_r(NULL, "\n", &save)) {
		note("kmemleak: %s", l);
		(*printed)++;
	}
	return true;
}

/* After everything above: kmemleak finds nothing allocated by the snapshot code. */
static void kmemleak_clean(void)
{
	char line[512], block[4096] = "";
	int reports = 0, ours = 0, printed = 0;
	FILE *f;

	if (access(KMEMLEAK, F_OK) != 0)
		mount("none", "/sys/kernel/debug", "debugfs", 0, NULL);
	if (!check(access(KMEMLEAK, R_OK | W_OK) == 0, "%s is there (CONFIG_DEBUG_KMEMLEAK=y)",
		   KMEMLEAK))
		return;
	/* kmemleak only reports objects older than 5 s; the free work must have run too. */
	sleep(6);
	check(write_file(KMEMLEAK, "scan"), "first scan");
	sleep(1);
	check(write_file(KMEMLEAK, "scan"), "second scan");
	f = fopen(KMEMLEAK, "r");
	if (!check(f != NULL, "read %s", KMEMLEAK))
		return;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, "unreferenced object", 19)) {
			reports++;
			ours += kmemleak_ours(block, &printed);
			block[0] = '\0';
		}
		if (strlen(block) + strlen(line) < sizeof(block))
			strcat(block, line);
	}
	ours += kmemleak_ours(block, &printed);
	fclose(f);
	note("kmemleak: %d report(s) in all", reports);
	check(ours == 0, "%d leak report(s) with ptrace snapshot code in the backtrace", ours);
}

/* -------------------------------------------------------------------- main */

struct scenario {
	const char *name;
	void (*run)(void);
};

#define SCENARIO(fn) { #fn, fn }

static const struct scenario scenarios[] = {
	SCENARIO(restore_roundtrip),
	SCENARIO(getsnapshot),
	SCENARIO(restore_twice),
	SCENARIO(replace_snapshot),
	SCENARIO(several_regions),
	SCENARIO(several_tracees),
	SCENARIO(unmapped_region),
	SCENARIO(readonly_region),
	SCENARIO(text_region),
	SCENARIO(len_limit),
	SCENARIO(total_limit),
	SCENARIO(bad_arguments),
	SCENARIO(non_tracer),
	SCENARIO(running_tracee),
	SCENARIO(freed_on_detach),
	SCENARIO(freed_on_exit),
	SCENARIO(dropped_on_exec),
	SCENARIO(concurrent_tracees),
	SCENARIO(shared_mm_threads),
	SCENARIO(killed_mid_request),
	SCENARIO(random_arguments),
	SCENARIO(kmemleak_clean),
};

#define SCENARIO_TIMEOUT 120

static volatile size_t current_scenario;

/* A scenario that hangs ends the suite with a result for it, not a silent guest hang. */
static void on_alarm(int sig)
{
	char line[160];
	int n;

	(void)sig;
	n = snprintf(line, sizeof(line), "# FAIL: still running after %d s\nnot ok %zu %s\n",
		     SCENARIO_TIMEOUT, current_scenario + 1, scenarios[current_scenario].name);
	if (write(STDOUT_FILENO, line, n) < 0)
		_exit(2);
	_exit(1);
}

static int kmsg_open(void)
{
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);

	if (fd >= 0)
		lseek(fd, 0, SEEK_END);
	return fd;
}

/* Kernel reports logged since kmsg_open(): each one fails the scenario. */
static void kmsg_check(int fd)
{
	static const char *const bad[] = { "WARNING:", "BUG:", "Oops", "general protection",
					   "possible circular locking", "inconsistent lock state",
					   "suspicious RCU usage", "sleeping function called",
					   "scheduling while atomic" };
	char rec[2048];
	int found = 0;
	ssize_t n;
	size_t i;

	if (fd < 0)
		return;
	for (;;) {
		n = read(fd, rec, sizeof(rec) - 1);
		if (n < 0 && errno == EPIPE)
			continue;
		if (n <= 0)
			break;
		rec[n] = '\0';
		for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
			if (strstr(rec, bad[i])) {
				rec[strcspn(rec, "\n")] = '\0';
				if (found++ < 5)
					note("kernel log: %s", strchr(rec, ';') ? strchr(rec, ';') + 1
								    : rec);
				break;
			}
	}
	close(fd);
	check(found == 0, "no kernel warning, BUG, oops or lockdep report (%d)", found);
}

int main(int argc, char **argv)
{
	size_t i;

	if (argc > 1 && !strcmp(argv[1], IDLE_ARG)) {	/* a tracee after CMD_EXEC */
		for (;;)
			raise(SIGSTOP);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGALRM, on_alarm);
	ktap_plan(KTAP_ARRAY_SIZE(scenarios));
	for (i = 0; i < KTAP_ARRAY_SIZE(scenarios); i++) {
		struct timespec t0, t1;
		int fd = kmsg_open();

		scenario_failures = 0;
		current_scenario = i;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		alarm(SCENARIO_TIMEOUT);
		scenarios[i].run();
		alarm(0);
		kmsg_check(fd);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		note("%.2f s", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
		ktap_ok(scenario_failures == 0, "%s", scenarios[i].name);
	}
	return ktap_finish();
}
