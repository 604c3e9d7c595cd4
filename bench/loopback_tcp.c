/* Loopback TCP cost per byte, without flatshard: one process sends N MiB
 * `iters` times to another over 127.0.0.1 (send(2) of the whole buffer, or
 * vmsplice(2) + splice(2) through a pipe with --splice), the receiver recv(2)s
 * into a 4 MiB ring. Prints GB/s and each side's CPU seconds.
 *
 *   cc -O2 -o /tmp/loopback_tcp bench/loopback_tcp.c
 *   /tmp/loopback_tcp 256 8                  # kernel-autotuned socket buffers
 *   /tmp/loopback_tcp 256 8 262144           # SO_SNDBUF = SO_RCVBUF = 256 KiB
 *   /tmp/loopback_tcp 256 8 0 --splice       # zero-copy send attempt
 *
 * This is the measurement behind the TCP transport's fixed socket buffers for
 * peers on the same host (src/comm/tcp.rs, LOCAL_SOCKBUF). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static double cpu(const struct rusage *u) {
    return u->ru_utime.tv_sec + u->ru_stime.tv_sec + 1e-6 * (u->ru_utime.tv_usec + u->ru_stime.tv_usec);
}
static void die(const char *what) {
    perror(what);
    exit(1);
}
static void set_bufs(int s, int bytes) {
    if (bytes > 0 && (setsockopt(s, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) || setsockopt(s, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes)))
        die("setsockopt");
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MiB iters [sockbuf_bytes] [--splice]\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)atol(argv[1]) << 20;
    int iters = atoi(argv[2]);
    int bufs = argc > 3 ? atoi(argv[3]) : 0;
    int splice_mode = argc > 4 && strcmp(argv[4], "--splice") == 0;
    const size_t ring = 4 << 20;

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (ls < 0 || bind(ls, (void *)&a, sizeof a) || getsockname(ls, (void *)&a, &al) || listen(ls, 1)) die("listen");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        int s = accept(ls, 0, 0);
        if (s < 0) die("accept");
        set_bufs(s, bufs);
        char *buf = malloc(ring);
        size_t total = n * iters, got = 0;
        while (got < total) {
            ssize_t k = recv(s, buf + got % ring, ring - got % ring, 0);
            if (k <= 0) die("recv");
            got += k;
        }
        char c = 1;
        if (send(s, &c, 1, 0) != 1) die("ack");
        exit(0);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    set_bufs(s, bufs);
    if (connect(s, (void *)&a, sizeof a)) die("connect");
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char *src = malloc(n);
    memset(src, 3, n);
    int p[2];
    if (pipe(p)) die("pipe");
    int pipe_bytes = fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    if (pipe_bytes <= 0) pipe_bytes = 1 << 16;
    double t0 = now();
    for (int it = 0; it < iters; it++) {
        for (size_t off = 0; off < n;) {
            ssize_t k;
            if (!splice_mode) {
                k = send(s, src + off, n - off, 0);
                if (k <= 0) die("send");
            } else {
                struct iovec v = {src + off, n - off < (size_t)pipe_bytes ? n - off : (size_t)pipe_bytes};
                k = vmsplice(p[1], &v, 1, 0);
                if (k <= 0) die("vmsplice");
                for (ssize_t left = k; left > 0;) {
                    ssize_t m = splice(p[0], 0, s, 0, left, SPLICE_F_MOVE | SPLICE_F_MORE);
                    if (m <= 0) die("splice");
                    left -= m;
                }
            }
            off += k;
        }
    }
    char c;
    if (recv(s, &c, 1, 0) != 1) die("ack");
    double t = now() - t0;
    int st;
    waitpid(pid, &st, 0);
    struct rusage me, kid;
    getrusage(RUSAGE_SELF, &me);
    getrusage(RUSAGE_CHILDREN, &kid);
    printf("%s, socket buffers %s: %.2f GB/s, sender cpu %.2f s, receiver cpu %.2f s\n", splice_mode ? "vmsplice+splice" : "send",
           bufs > 0 ? argv[3] : "autotuned", (double)n * iters / t / 1e9, cpu(&me), cpu(&kid));
    return 0;
}
