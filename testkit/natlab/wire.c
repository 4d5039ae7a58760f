/* wire: a user-space link emulator between two network namespaces (testkit/natlab/links.py).
 *
 * It creates one TAP device (IFF_TAP | IFF_NO_PI) in each of two namespaces, "a" (the home or
 * host side) and "b" (the internet side), and copies Ethernet frames between them. Each
 * direction (up = a -> b, down = b -> a) has, in this order:
 *   - a serialising rate limit: a frame leaves the queue len*8/rate seconds after the previous
 *     one (len = IP packet, without the 14-byte Ethernet header), with a tail-drop queue of
 *     QUEUE bytes waiting to be serialised;
 *   - Bernoulli loss (each frame that left the queue is lost with probability LOSS);
 *   - a one-way delay DELAY plus a uniform jitter in [-JITTER, +JITTER], never releasing a
 *     frame before the previous one of its direction (FIFO: no reordering).
 * Counters live in a shared, mmap'ed stats file (layout below), always current.
 *
 * usage: wire --a-netns PATH --a-if NAME --b-netns PATH --b-if NAME
 *             --up RATE_BPS,DELAY_NS,JITTER_NS,LOSS,QUEUE_BYTES --down ... --stats FILE
 *             [--seed N] [--realtime]
 * RATE_BPS 0 = unlimited. Prints "ready" on stdout once both TAPs exist; exits 0 on SIGTERM,
 * SIGINT or SIGHUP (the TAPs vanish with it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define SLOT 2048      /* bytes per frame slot; frames are at most MTU + 14 */
#define BATCH 64       /* frames read per fd per wake-up */
#define ETH_HLEN_ 14
#define MAGIC 0x3130455249574c50ULL /* "PLWIRE01" little-endian */

/* Stats file: uint64 magic, pid, running, ncounters; then up[NC], down[NC]. */
enum { C_RX_PACKETS, C_RX_BYTES, C_PACKETS, C_BYTES, C_DROP_QUEUE, C_DROP_LOSS, C_DROP_WRITE,
       C_BACKLOG_MAX, C_LATE_NS, NC };
struct stats { uint64_t magic, pid, running, ncounters; uint64_t c[2][NC]; };

struct dir {
    int in_fd, out_fd;
    double rate_bps;
    int64_t delay_ns, jitter_ns, qlimit;
    uint64_t loss_threshold; /* loss probability * 2^64 */
    int lossy;
    int64_t last_depart, last_deliver;
    uint8_t *buf;
    uint16_t *len;
    int64_t *due;
    uint32_t cap, head, count;
    volatile uint64_t *c;
};

static volatile sig_atomic_t stop_flag;
static uint64_t rng_state;

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "wire: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_tap(const char *netns, const char *ifname) {
    int nsfd = open(netns, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) die(netns);
    if (setns(nsfd, CLONE_NEWNET) < 0) die("setns");
    close(nsfd);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    if (strlen(ifname) >= IFNAMSIZ) { fprintf(stderr, "wire: interface name too long\n"); exit(2); }
    strcpy(ifr.ifr_name, ifname);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    return fd;
}

static void parse_dir(struct dir *d, const char *spec) {
    double rate, delay, jitter, loss, queue;
    if (sscanf(spec, "%lf,%lf,%lf,%lf,%lf", &rate, &delay, &jitter, &loss, &queue) != 5
        || rate < 0 || delay < 0 || jitter < 0 || jitter > delay + 1e-9 || loss < 0 || loss > 1
        || queue < 0) {
        fprintf(stderr, "wire: bad direction spec %s (RATE_BPS,DELAY_NS,JITTER_NS,LOSS,QUEUE)"
                " with jitter <= delay, 0 <= loss <= 1\n", spec);
        exit(2);
    }
    d->rate_bps = rate;
    d->delay_ns = (int64_t)delay;
    d->jitter_ns = (int64_t)jitter;
    d->lossy = loss > 0;
    d->loss_threshold = loss >= 1 ? UINT64_MAX : (uint64_t)(loss * 18446744073709551616.0);
    d->qlimit = (int64_t)queue;
    /* enough slots for a full queue plus what is in flight at the rate limit, small frames */
    double bytes = queue + (rate > 0 ? rate : 1e9) / 8 * (delay + jitter + 20e6) / 1e9;
    double cap = bytes / 256;
    d->cap = cap < 4096 ? 4096 : cap > 131072 ? 131072 : (uint32_t)cap;
    size_t size = (size_t)d->cap * (SLOT + sizeof(uint16_t) + sizeof(int64_t));
    uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    d->buf = mem;
    d->due = (int64_t *)(mem + (size_t)d->cap * SLOT);
    d->len = (uint16_t *)(d->due + d->cap);
}

/* A frame of n bytes was read into the tail slot at time now: queue it or drop it. */
static void admit(struct dir *d, size_t n, int64_t now) {
    volatile uint64_t *c = d->c;
    c[C_RX_PACKETS]++;
    c[C_RX_BYTES] += n;
    int64_t depart = now;
    if (d->rate_bps > 0) {
        int64_t ip_len = n > ETH_HLEN_ ? (int64_t)n - ETH_HLEN_ : (int64_t)n;
        int64_t start = d->last_depart > now ? d->last_depart : now;
        int64_t backlog = (int64_t)((double)(start - now) * d->rate_bps / 8e9);
        if (backlog + ip_len > d->qlimit) { c[C_DROP_QUEUE]++; return; }
        if ((uint64_t)(backlog + ip_len) > c[C_BACKLOG_MAX]) c[C_BACKLOG_MAX] = backlog + ip_len;
        depart = start + (int64_t)((double)ip_len * 8e9 / d->rate_bps);
        d->last_depart = depart;
    }
    if (d->lossy && rnd() < d->loss_threshold) { c[C_DROP_LOSS]++; return; }
    int64_t delay = d->delay_ns;
    if (d->jitter_ns > 0)
        delay += (int64_t)(((double)(rnd() >> 11) * 0x1p-53 * 2 - 1) * (double)d->jitter_ns);
    int64_t deliver = depart + delay;
    if (deliver < d->last_deliver) deliver = d->last_deliver;
    d->last_deliver = deliver;
    uint32_t tail = (d->head + d->count) % d->cap;
    d->due[tail] = deliver;
    d->len[tail] = (uint16_t)n;
    d->count++;
}

static void read_some(struct dir *d) {
    static uint8_t scratch[SLOT];
    for (int i = 0; i < BATCH; i++) {
        int full = d->count == d->cap;
        uint8_t *slot = full ? scratch : d->buf + (size_t)((d->head + d->count) % d->cap) * SLOT;
        ssize_t n = read(d->in_fd, slot, SLOT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            die("read");
        }
        int64_t now = now_ns();
        if (full || n >= SLOT) {
            d->c[C_RX_PACKETS]++;
            d->c[C_RX_BYTES] += (uint64_t)n;
            d->c[C_DROP_QUEUE]++;
            continue;
        }
        admit(d, (size_t)n, now);
    }
}

static void deliver_due(struct dir *d, int64_t now) {
    while (d->count > 0 && d->due[d->head] <= now) {
        uint32_t h = d->head;
        ssize_t w = write(d->out_fd, d->buf + (size_t)h * SLOT, d->len[h]);
        if (w < 0) {
            d->c[C_DROP_WRITE]++;
        } else {
            d->c[C_PACKETS]++;
            d->c[C_BYTES] += d->len[h];
            d->c[C_LATE_NS] += (uint64_t)(now - d->due[h]);
        }
        d->head = (h + 1) % d->cap;
        d->count--;
    }
}

int main(int argc, char **argv) {
    const char *a_ns = NULL, *a_if = NULL, *b_ns = NULL, *b_if = NULL, *up = NULL, *down = NULL,
               *stats_path = NULL;
    int realtime = 0;
    rng_state = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);
    static const struct option opts[] = {
        {"a-netns", 1, 0, 'A'}, {"a-if", 1, 0, 'a'}, {"b-netns", 1, 0, 'B'}, {"b-if", 1, 0, 'b'},
        {"up", 1, 0, 'u'}, {"down", 1, 0, 'd'}, {"stats", 1, 0, 's'}, {"seed", 1, 0, 'r'},
        {"realtime", 0, 0, 'R'}, {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'A': a_ns = optarg; break;
        case 'a': a_if = optarg; break;
        case 'B': b_ns = optarg; break;
        case 'b': b_if = optarg; break;
        case 'u': up = optarg; break;
        case 'd': down = optarg; break;
        case 's': stats_path = optarg; break;
        case 'r': rng_state = strtoull(optarg, NULL, 0); break;
        case 'R': realtime = 1; break;
        default: return 2;
        }
    }
    if (!a_ns || !a_if || !b_ns || !b_if || !up || !down || !stats_path || optind != argc) {
        fprintf(stderr, "usage: wire --a-netns PATH --a-if NAME --b-netns PATH --b-if NAME "
                "--up SPEC --down SPEC --stats FILE [--seed N] [--realtime]\n");
        return 2;
    }
    struct dir dirs[2];
    memset(dirs, 0, sizeof dirs);
    parse_dir(&dirs[0], up);
    parse_dir(&dirs[1], down);

    int sfd = open(stats_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (sfd < 0) die(stats_path);
    if (ftruncate(sfd, sizeof(struct stats)) < 0) die("ftruncate");
    struct stats *st = mmap(NULL, sizeof *st, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (st == MAP_FAILED) die("mmap stats");
    close(sfd);
    st->pid = (uint64_t)getpid();
    st->ncounters = NC;
    dirs[0].c = st->c[0];
    dirs[1].c = st->c[1];

    sigset_t block, empty;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, NULL);
    sigemptyset(&empty);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* The wire stays in namespace b (the internet side), so a sweep of it finds the wire. */
    int fd_a = open_tap(a_ns, a_if);
    int fd_b = open_tap(b_ns, b_if);
    dirs[0].in_fd = fd_a; dirs[0].out_fd = fd_b;
    dirs[1].in_fd = fd_b; dirs[1].out_fd = fd_a;

    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* ns-precise ppoll time-outs */
    if (realtime) {
        struct sched_param sp = {.sched_priority = 10};
        if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0) setpriority(PRIO_PROCESS, 0, -10);
    }
    st->magic = MAGIC;
    st->running = 1;
    printf("ready\n");
    fflush(stdout);

    struct pollfd pfd[2] = {{fd_a, POLLIN, 0}, {fd_b, POLLIN, 0}};
    while (!stop_flag) {
        int64_t now = now_ns();
        deliver_due(&dirs[0], now);
        deliver_due(&dirs[1], now);
        int64_t next = INT64_MAX;
        for (int i = 0; i < 2; i++)
            if (dirs[i].count > 0 && dirs[i].due[dirs[i].head] < next)
                next = dirs[i].due[dirs[i].head];
        struct timespec ts, *tsp = NULL;
        if (next != INT64_MAX) {
            int64_t wait = next - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
            tsp = &ts;
        }
        int r = ppoll(pfd, 2, tsp, &empty);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("ppoll");
        }
        for (int i = 0; i < 2; i++) {
            if (pfd[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fprintf(stderr, "wire: TAP %s went away\n", i ? b_if : a_if);
                stop_flag = 1;
            } else if (pfd[i].revents & POLLIN) {
                read_some(&dirs[i]);
            }
        }
    }
    st->running = 0;
    close(fd_a);
    close(fd_b);
    munmap(st, sizeof *st);
    return 0;
}
