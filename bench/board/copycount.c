/*
 * copycount: an LD_PRELOAD shim that counts how many bytes a process copies with the C library's
 * memcpy/memmove (and their _chk / mempcpy variants), for the board benchmark (bench/board/run.sh).
 *
 * It counts only calls that go through the dynamic symbol (PLT): GStreamer, GLib, the Rust code of
 * the plugin and of bufshare-bench all call memcpy that way for large copies. It does NOT see copies
 * done inside glibc itself, hand-written or vectorised copy loops (e.g. ORC code), or copies by the
 * kernel (read(), write(), a V4L2 driver touching the frame).
 *
 * Counted: calls with n >= COPYCOUNT_MIN bytes (default 512, less than one 640-pixel line, so a
 * frame copied line by line is still counted) and their bytes, and the calls with n >=
 * COPYCOUNT_FRAME bytes. On SIGUSR1 the shim appends one line
 *   "<calls_min> <bytes_min> <calls_frame>"
 * to $COPYCOUNT_DIR/<pid>; the orchestrator signals before and after its measurement window and
 * takes the difference. SIGUSR1 is blocked in every thread (threads inherit the mask set here, before
 * main) and taken with sigwait() by a thread of the shim's own, so no poll() or read() of the
 * program is interrupted by it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef void *(*copy_fn)(void *, const void *, size_t);

static copy_fn real_memcpy, real_memmove, real_mempcpy;
static atomic_int resolving;
static size_t min_len = 512, frame_len = SIZE_MAX;
static atomic_ullong calls_min, bytes_min, calls_frame;

/* Used only while dlsym runs: a plain loop the compiler must not turn back into memcpy. */
static void *slow_copy(void *dst, const void *src, size_t n)
{
    volatile unsigned char *d = dst;
    const volatile unsigned char *s = src;
    if (d < s) {
        for (size_t i = 0; i < n; i++) d[i] = s[i];
    } else {
        for (size_t i = n; i > 0; i--) d[i - 1] = s[i - 1];
    }
    return dst;
}

static void resolve(void)
{
    if (atomic_exchange(&resolving, 1)) return;
    real_memcpy = (copy_fn)dlsym(RTLD_NEXT, "memcpy");
    real_memmove = (copy_fn)dlsym(RTLD_NEXT, "memmove");
    real_mempcpy = (copy_fn)dlsym(RTLD_NEXT, "mempcpy");
}

static inline void count(size_t n)
{
    if (n >= min_len) {
        atomic_fetch_add_explicit(&calls_min, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&bytes_min, n, memory_order_relaxed);
        if (n >= frame_len) atomic_fetch_add_explicit(&calls_frame, 1, memory_order_relaxed);
    }
}

void *memcpy(void *dst, const void *src, size_t n)
{
    if (!real_memcpy) resolve();
    if (!real_memcpy) return slow_copy(dst, src, n);
    count(n);
    return real_memcpy(dst, src, n);
}

void *memmove(void *dst, const void *src, size_t n)
{
    if (!real_memmove) resolve();
    if (!real_memmove) return slow_copy(dst, src, n);
    count(n);
    return real_memmove(dst, src, n);
}

void *mempcpy(void *dst, const void *src, size_t n)
{
    if (!real_mempcpy) resolve();
    if (!real_mempcpy) return (char *)slow_copy(dst, src, n) + n;
    count(n);
    return real_mempcpy(dst, src, n);
}

void *__memcpy_chk(void *dst, const void *src, size_t n, size_t dstlen)
{
    if (n > dstlen) abort();
    return memcpy(dst, src, n);
}

void *__memmove_chk(void *dst, const void *src, size_t n, size_t dstlen)
{
    if (n > dstlen) abort();
    return memmove(dst, src, n);
}

/* "$COPYCOUNT_DIR/", set at load time (getenv is not async-signal-safe). */
static char copycount_path_prefix[4000];

static char *put_u64(char *p, unsigned long long v)
{
    char tmp[24];
    int i = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i) *p++ = tmp[--i];
    return p;
}

static void dump(void)
{
    char path[4096];
    char *p = path;
    for (const char *q = copycount_path_prefix; *q && p < path + sizeof path - 32; q++) *p++ = *q;
    p = put_u64(p, (unsigned long long)getpid());
    *p = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[96];
    char *l = line;
    l = put_u64(l, atomic_load(&calls_min));
    *l++ = ' ';
    l = put_u64(l, atomic_load(&bytes_min));
    *l++ = ' ';
    l = put_u64(l, atomic_load(&calls_frame));
    *l++ = '\n';
    ssize_t ignored = write(fd, line, (size_t)(l - line));
    (void)ignored;
    close(fd);
}

static void *dump_thread(void *arg)
{
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) == 0) dump();
    }
    return NULL;
}

__attribute__((constructor)) static void init(void)
{
    resolve();
    const char *v = getenv("COPYCOUNT_MIN");
    if (v) min_len = strtoull(v, NULL, 10);
    v = getenv("COPYCOUNT_FRAME");
    if (v) frame_len = strtoull(v, NULL, 10);
    const char *dir = getenv("COPYCOUNT_DIR");
    if (!dir) dir = "/tmp";
    size_t n = strlen(dir);
    if (n > sizeof copycount_path_prefix - 2) n = sizeof copycount_path_prefix - 2;
    real_memcpy(copycount_path_prefix, dir, n);
    copycount_path_prefix[n] = '/';
    copycount_path_prefix[n + 1] = 0;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&thread, &attr, dump_thread, NULL);
    pthread_attr_destroy(&attr);
}
