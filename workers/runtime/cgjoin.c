/* toolq's launcher step between the worker and bwrap (or Bun): join the process's
 * cgroups, set its open-file limit, drop to the tools' uid, exec the rest.
 *
 *   cgjoin [-c CGROUP_PROCS_FILE]... -n NOFILE [-u UID] -- PROGRAM [ARG]...
 *
 * What limits.joining()'s shell and setpriv do, in one small exec instead of two
 * (`sh -c 'echo 0 > ...; ulimit -n ...; exec setpriv ... "$@"'`): ~0.3 ms of CPU per
 * process instead of ~2 ms (bench/investigations/spawn_breakdown.py). The order is
 * the same: joining needs root, so it comes first; a failed step exits 126 before
 * PROGRAM runs (127: PROGRAM cannot be executed). Built by `make setup` (static where
 * the toolchain can); without it the launcher uses the shell.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static int fail(const char *what, const char *arg) {
    fprintf(stderr, "cgjoin: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    return 126;
}

static int number(const char *text, unsigned long *out) {
    char *end;
    errno = 0;
    *out = strtoul(text, &end, 10);
    return errno == 0 && end != text && *end == '\0';
}

int main(int argc, char **argv) {
    unsigned long nofile = 0, uid = 0;
    int have_nofile = 0, have_uid = 0, i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i += 2) {
        if (i + 1 >= argc) {
            errno = EINVAL;
            return fail("missing value for", argv[i]);
        }
        const char *value = argv[i + 1];
        if (strcmp(argv[i], "-c") == 0) {
            int fd = open(value, O_WRONLY | O_CLOEXEC);
            if (fd < 0 || write(fd, "0", 1) != 1) return fail("cannot join", value);
            close(fd);
        } else if (strcmp(argv[i], "-n") == 0 && number(value, &nofile)) {
            have_nofile = 1;
        } else if (strcmp(argv[i], "-u") == 0 && number(value, &uid)) {
            have_uid = 1;
        } else {
            errno = EINVAL;
            return fail("bad option", argv[i]);
        }
    }
    if (i + 1 >= argc || !have_nofile) {
        errno = EINVAL;
        return fail("usage: cgjoin [-c FILE]... -n NOFILE [-u UID] -- PROGRAM [ARG]...", NULL);
    }
    struct rlimit limit = {nofile, nofile};
    if (setrlimit(RLIMIT_NOFILE, &limit) != 0) return fail("cannot set RLIMIT_NOFILE", NULL);
    if (have_uid) {
        if (setgroups(0, NULL) != 0) return fail("cannot clear groups", NULL);
        if (setresgid(uid, uid, uid) != 0) return fail("cannot set gid", NULL);
        if (setresuid(uid, uid, uid) != 0) return fail("cannot set uid", NULL);
    }
    execvp(argv[i + 1], &argv[i + 1]);
    fprintf(stderr, "cgjoin: cannot execute %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}
