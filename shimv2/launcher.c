/*
 * containerd-shim-pyshim-v2, native front: hands `start` and `delete` to the
 * fork server without starting a Python interpreter.
 *
 * containerd runs the shim binary for every container start (`start`) and, in
 * 1.6/1.7, for every task delete (`delete`, from its on-close clean-up). A
 * Python launcher spends ~8 ms starting the interpreter before it can even ask
 * the fork server (shimv2/forkserver.py); this program asks in well under a
 * millisecond. It speaks the fork server's protocol and nothing else:
 *
 *   request  "pyshim-forkserver 3\0" ARGC "\0" ARGV[1..] "\0"... ENV "\0"...
 *            + SCM_RIGHTS: stdin, stdout, stderr, working directory
 *   answers  "ack" (a child was forked: the command may run from here on),
 *            then "exit N"; or "refused WHY" (nothing ran)
 *
 * Everything else (other commands, no server, a refusal, an old server)
 * executes the Python launcher, <this binary's real path>.py, with the same
 * arguments, as `<python of its #! line> -I -S <path>.py ARGS` (a wheel's
 * "#!python" line is rewritten by pip to the bare interpreter path, without
 * flags): it runs the command itself exactly as before, and `start` there
 * launches a fork server for the next calls. PYSHIM_FORKSERVER_TRIED=<tag>
 * tells it that the server of that version was asked already (it removes the
 * variable at once: the shim's children never see it). Staying out of the way is the
 * rule: the only failures reported here are those after the server's "ack",
 * where running the command again could do things twice.
 *
 * Built by `python -I -m shimv2.launcher PATH` (or setup.py, into a wheel) with
 * -DPYSHIM_TAG="<tag>", the fork server version (forkserver.version_tag()) of
 * the files it was built for: after an upgrade or an edit this binary finds no
 * server of its tag and falls back, never reaching a server of other code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <fcntl.h>
#include <unistd.h>

#ifndef PYSHIM_TAG
#error "build with -DPYSHIM_TAG=\"...\" (python -I -m shimv2.launcher PATH does)"
#endif

#define PROTOCOL "pyshim-forkserver 3"
#define DEFAULT_DIR "/run/pyshim"
#define TIMEOUT_SECONDS 120
#define MAX_REQUEST (1 << 20)

extern char **environ;

static const char *action = "";
static char server_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

/* The interpreter of a "#!/path/to/python[ flags]" line, copied into python;
 * 0 for anything else ("#!/usr/bin/env python3", "#!/bin/sh": run by the kernel). */
static int interpreter(const char *script, char python[PATH_MAX])
{
    char line[PATH_MAX + 3];
    int fd = open(script, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n < 3 || line[0] != '#' || line[1] != '!')
        return 0;
    line[n] = '\0';
    char *path = line + 2 + strspn(line + 2, " \t");
    size_t len = strcspn(path, " \t\r\n");
    if (len == 0 || len >= PATH_MAX || path[len] == '\0') /* none, or cut off */
        return 0;
    path[len] = '\0';
    const char *base = strrchr(path, '/');
    if (strncmp(base ? base + 1 : path, "python", 6))
        return 0;
    memcpy(python, path, len + 1);
    return 1;
}

/* Run the Python launcher next to our real path with our arguments, isolated
 * and without site initialisation (-I -S: ~10 ms less, and the same whether its
 * #! line kept the flags or not). */
static void run_python(int argc, char **argv, int tried)
{
    if (tried)
        setenv("PYSHIM_FORKSERVER_TRIED", PYSHIM_TAG, 1);
    static const char deleted[] = " (deleted)";
    char script[PATH_MAX + 4];
    ssize_t n = readlink("/proc/self/exe", script, PATH_MAX);
    if (n <= 0 || n >= PATH_MAX) {
        fprintf(stderr, "containerd-shim-pyshim-v2: cannot resolve /proc/self/exe\n");
        _exit(127);
    }
    /* Replaced while we waited for the server (an upgrade renamed a new binary
     * over us): the kernel appends " (deleted)"; the .py next to it is current. */
    if ((size_t)n > sizeof deleted - 1 &&
        !memcmp(script + n - (sizeof deleted - 1), deleted, sizeof deleted - 1))
        n -= sizeof deleted - 1;
    memcpy(script + n, ".py", 4);
    char python[PATH_MAX];
    char **args = calloc((size_t)argc + 4, sizeof *args); /* NULL-terminated */
    if (args && argc > 0 && interpreter(script, python)) {
        args[0] = python;
        args[1] = "-I";
        args[2] = "-S";
        args[3] = script;
        memcpy(args + 4, argv + 1, (size_t)(argc - 1) * sizeof *args);
        execv(python, args);
    }
    argv[0] = script; /* no interpreter named, or it failed: the kernel's way */
    execv(script, argv);
    fprintf(stderr, "containerd-shim-pyshim-v2: cannot run %s: %s\n", script, strerror(errno));
    _exit(127);
}

/* The command may have run: report, never run it a second time. */
static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "failed to %s shim: fork server at %s: %s%s\n", action, server_path, what,
            detail);
    _exit(1);
}

static int wants_fork_server(int argc, char **argv)
{
    const char *enable = getenv("PYSHIM_FORKSERVER");
    if (enable && (!strcasecmp(enable, "0") || !strcasecmp(enable, "off") ||
                   !strcasecmp(enable, "false") || !strcasecmp(enable, "no")))
        return 0;
    /* containerd puts the action last, after the flags */
    if (argc < 2 || (strcmp(argv[argc - 1], "start") && strcmp(argv[argc - 1], "delete")))
        return 0;
    action = argv[argc - 1];
    const char *dir = getenv("PYSHIM_FORKSERVER_DIR");
    if (!dir || !*dir)
        dir = DEFAULT_DIR;
    int n = snprintf(server_path, sizeof server_path, "%s/forkserver-%s.sock", dir, PYSHIM_TAG);
    return n > 0 && (size_t)n < sizeof server_path;
}

/* The request, or NULL when it would not fit in one message. */
static char *build_request(int argc, char **argv, size_t *size)
{
    char count[16];
    int count_len = snprintf(count, sizeof count, "%d", argc - 1);
    size_t total = sizeof PROTOCOL + (size_t)count_len + 1;
    for (int i = 1; i < argc; i++)
        total += strlen(argv[i]) + 1;
    for (char **e = environ; *e; e++)
        total += strlen(*e) + 1;
    if (total > MAX_REQUEST)
        return NULL;
    char *request = malloc(total), *p = request;
    if (!request)
        return NULL;
    memcpy(p, PROTOCOL, sizeof PROTOCOL);
    p += sizeof PROTOCOL;
    memcpy(p, count, (size_t)count_len + 1);
    p += count_len + 1;
    for (int i = 1; i < argc; i++)
        p = stpcpy(p, argv[i]) + 1;
    for (char **e = environ; *e; e++)
        p = stpcpy(p, *e) + 1;
    *size = total;
    return request;
}

/* Send the request with our stdio and working directory; 0 when the server took it. */
static int send_request(int conn, char *request, size_t size)
{
    int fds[4] = {0, 1, 2, open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    if (fds[3] < 0)
        return -1;
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = request, .iov_len = size};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof control.buf,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t sent;
    do
        sent = sendmsg(conn, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    close(fds[3]);
    return sent == (ssize_t)size ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (!wants_fork_server(argc, argv))
        run_python(argc, argv, 0);
    int conn = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (conn < 0)
        run_python(argc, argv, 0);
    struct timeval timeout = {.tv_sec = TIMEOUT_SECONDS};
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, server_path, sizeof server_path);
    size_t size;
    char *request = build_request(argc, argv, &size);
    struct ucred server;
    socklen_t server_len = sizeof server;
    if (!request || connect(conn, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &server, &server_len) < 0 ||
        server.uid != geteuid() || /* a socket someone else put there: never ours */
        send_request(conn, request, size) < 0) {
        close(conn);
        run_python(argc, argv, 1); /* nothing ran */
    }
    int started = 0; /* the server forked a child for us ("ack") */
    for (;;) {
        char answer[4096];
        ssize_t n = recv(conn, answer, sizeof answer - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            fail("no answer in 120s", "");
        if (n < 0 && started)
            fail("failed: ", strerror(errno));
        if (n < 0)
            n = 0; /* reset before the ack: the server went away */
        answer[n] = '\0';
        if (n == 3 && !memcmp(answer, "ack", 3)) {
            started = 1;
            continue;
        }
        if (n > 5 && !memcmp(answer, "exit ", 5)) {
            char *end;
            long status = strtol(answer + 5, &end, 10);
            if (*end == '\0' && end != answer + 5 && status >= 0 && status <= 255)
                _exit((int)status);
        }
        if (n >= 8 && !memcmp(answer, "refused ", 8)) {
            close(conn);
            run_python(argc, argv, 1); /* nothing ran; the Python launcher runs it here */
        }
        if (n == 0 && !started) {
            close(conn);
            run_python(argc, argv, 1); /* the server died (or exited) before forking for us */
        }
        if (n == 0)
            fail("the command was cut short", "");
        answer[100 < n ? 100 : n] = '\0';
        fail("answered ", answer);
    }
}
