/*
 * loadgen: the compiled load generator of bench/relay_bench.py.
 *
 *     gcc -O2 -Wall -Wextra -o loadgen bench/loadgen/loadgen.c   (relay_bench.py does this itself)
 *     loadgen PLAN_FILE  > result.json
 *
 * One single-threaded epoll loop drives N non-blocking connections to 127.0.0.1 (the only address
 * it ever connects to). Python (relay_bench.py) does everything that needs the medrelay codec and
 * writes a plan: the `hello` frame, a `resume` frame per device (session tokens are seeded into
 * the server's database), and per sender a ready-made deterministic-CBOR `send` frame whose
 * message id, `rid` and payload timestamp/counter sit at known offsets and are overwritten here.
 * So this file needs no Ed25519 and no general CBOR encoder: it encodes only `ack` frames and
 * reads only what it needs from `welcome`, `authenticated`, `sent`, `deliver` and `error`.
 *
 * Modes:
 *   throughput  every sender keeps `depth` sends in flight (a new one per `sent`);
 *   latency     sends paced to a global `rate` (envelopes/s), round-robin over the senders;
 *   idle        connect and authenticate every device, hold the connections `hold` seconds;
 *   minimal     bench/minimal_relay.py: no WebSocket, length-prefixed frames, the throughput
 *               pattern (a sender's next frame goes out on each 8-byte acknowledgement).
 *
 * Payload convention (shared with the Python generator): the first 8 bytes of each ciphertext are
 * the send time (CLOCK_MONOTONIC ns, big-endian), the next 8 a per-sender counter from 0. A
 * recipient measures send-to-deliver latency from the first and checks exactly-once, in-order
 * delivery from the second (each recipient has exactly one sender in this benchmark).
 *
 * Plan file (text, one item per line, byte strings in hex, "-" for none):
 *   loadgen-plan 1
 *   mode throughput|latency|idle|minimal
 *   port N                path /v1/ws            seconds F      warmup F
 *   rate F                depth N                hold F         drain F
 *   connect_timeout F     login_concurrency N    max_samples N  samples PATH|-
 *   hello HEX             (WebSocket modes: the hello frame, 4-byte length prefix included)
 *   ack HEX               (minimal: the acknowledgement frame a recipient sends)
 *   conn ROLE LOGIN TEMPLATE ID_OFF TS_OFF RID_OFF     (ROLE: S sender, R recipient, I idle;
 *                          LOGIN: the resume frame, or the raw id frame in minimal mode;
 *                          TEMPLATE: the sender's frame; offsets -1 when absent)
 *
 * Output on stdout: the lines "event window_start" and "event window_end" as the measurement
 * window opens and closes, then one JSON object (counts, window, CPU from getrusage, latency
 * percentiles, error counts by kind and by server error code). Latency samples (uint32 microseconds, native
 * byte order) go to the `samples` file when one is named, so several processes can be merged.
 *
 * Every frame read is validated (WebSocket header, lengths against fixed bounds, CBOR structure):
 * a malformed input closes that connection and counts an error; it never crashes the tool. Every
 * loop is bounded in count and every phase in time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

/* -- limits ------------------------------------------------------------------------------- */

#define MAX_FRAME (1u << 20)             /* protocol frame body (docs/protocol.md §12) */
#define MAX_WS_MESSAGE (MAX_FRAME + 4)   /* one WebSocket message: whole frames only (§1) */
#define MAX_HTTP_HEAD 8192               /* the 101 response */
#define MAX_PEND (64u * 1024)            /* protocol frames gathered into one outgoing message */
#define MAX_WBUF (16u << 20)             /* unwritten bytes per connection before it is an error */
#define MAX_RBUF (MAX_WS_MESSAGE + 64)   /* a whole WebSocket frame (header included) must fit */
#define MAX_TEMPLATE (300u * 1024)
#define MAX_CONNS 100000
#define MAX_ITEMS 256                    /* items per deliver (§12) */
#define MAX_CODES 16                     /* distinct server error codes kept for the report */
#define EV_TIMER UINT32_MAX              /* epoll tag of the pacing timer */

/* -- small helpers ------------------------------------------------------------------------ */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory (%zu bytes)", n);
    return q;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v) {
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

static uint32_t get_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p) { return (uint64_t)get_be32(p) << 32 | get_be32(p + 4); }

/* A growable byte buffer; `off` is where unconsumed data starts (read side). */
typedef struct {
    uint8_t *p;
    size_t len, cap, off;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_append(buf_t *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

/* Drop consumed bytes; give memory back when an idle connection's buffer grew large. */
static void buf_compact(buf_t *b) {
    if (b->off == 0) return;
    if (b->off >= b->len) {
        b->len = b->off = 0;
        if (b->cap > (256u << 10)) { free(b->p); b->p = NULL; b->cap = 0; }
        return;
    }
    memmove(b->p, b->p + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
}

/* -- statistics --------------------------------------------------------------------------- */

enum err_kind { E_CONNECT, E_UPGRADE, E_WS, E_FRAME, E_CBOR, E_SERVER, E_CLOSED, E_OVERFLOW,
                E_UNEXPECTED, E_LOGIN_TIMEOUT, E_KINDS };
static const char *ERR_NAMES[E_KINDS] = {"connect", "upgrade", "websocket", "frame", "cbor",
                                         "server_error", "closed", "write_overflow", "unexpected",
                                         "login_timeout"};

static struct {
    uint64_t errors[E_KINDS];
    char codes[MAX_CODES][65];
    uint64_t code_counts[MAX_CODES];
    int ncodes;
    uint64_t issued, confirmed, refused;           /* sends written / `sent` / refused by error */
    uint64_t delivered_total, delivered_window, other_items;
    uint64_t acks, acked_seqs, duplicates, gaps, deliver_frames;
    uint32_t *samples;                             /* latency in the window, microseconds */
    size_t nsamples, max_samples, dropped_samples;
} st;

static void count_code(const uint8_t *code, size_t n) {
    if (n > 64) n = 64;
    for (int i = 0; i < st.ncodes; i++)
        if (strlen(st.codes[i]) == n && memcmp(st.codes[i], code, n) == 0) { st.code_counts[i]++; return; }
    if (st.ncodes == MAX_CODES) return;
    memcpy(st.codes[st.ncodes], code, n);
    st.codes[st.ncodes][n] = 0;
    /* Codes are identifiers; keep the JSON output valid whatever the server sent. */
    for (size_t i = 0; i < n; i++) {
        char ch = st.codes[st.ncodes][i];
        if (ch < 0x20 || ch > 0x7e || ch == '"' || ch == '\\') st.codes[st.ncodes][i] = '?';
    }
    st.code_counts[st.ncodes++] = 1;
}

/* -- plan --------------------------------------------------------------------------------- */

enum mode { M_THROUGHPUT, M_LATENCY, M_IDLE, M_MINIMAL };
enum role { R_SENDER, R_RECIPIENT, R_IDLE };
enum state { S_WAITING, S_CONNECTING, S_UPGRADE, S_WELCOME, S_AUTH, S_READY, S_CLOSED };

typedef struct {
    int fd;
    uint32_t idx;
    enum role role;
    enum state state;
    uint8_t *login, *tmpl;        /* resume (or minimal id) frame; the sender's frame template */
    size_t login_len, tmpl_len;
    long id_off, ts_off, rid_off;
    buf_t rbuf;                   /* bytes read, not yet parsed */
    buf_t msg;                    /* a fragmented WebSocket message being reassembled */
    int in_msg;
    buf_t pend;                   /* protocol frames for the next outgoing message */
    buf_t wbuf;                   /* bytes to write (off = written so far) */
    int want_out, dirty;
    uint64_t counter;             /* sends issued by this sender */
    uint32_t inflight;
    uint64_t next_ctr;            /* recipient: the counter expected next */
} conn_t;

static struct {
    enum mode mode;
    int port;
    char path[256];
    double seconds, warmup, rate, hold, drain, connect_timeout;
    long depth, login_concurrency;
    char samples_path[4096];
    uint8_t *hello, *ack;
    size_t hello_len, ack_len;
    conn_t *conns;
    size_t nconns;
} plan;

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static uint8_t *parse_hex(const char *s, size_t *out_len, size_t max) {
    if (strcmp(s, "-") == 0) { *out_len = 0; return NULL; }
    size_t n = strlen(s);
    if (n % 2 || n / 2 > max) die("bad hex string of %zu characters in plan", n);
    uint8_t *p = xrealloc(NULL, n / 2);
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) die("bad hex digit in plan");
        p[i] = (uint8_t)(hi << 4 | lo);
    }
    *out_len = n / 2;
    return p;
}

static double parse_num(const char *s, double lo, double hi, const char *what) {
    char *end;
    double v = strtod(s, &end);
    if (*end || v < lo || v > hi) die("bad %s in plan: %s", what, s);
    return v;
}

static void load_plan(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open plan %s", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    if (size < 0 || size > (1l << 30)) die("plan too large");
    fseek(f, 0, SEEK_SET);
    char *text = xrealloc(NULL, (size_t)size + 1);
    if (fread(text, 1, (size_t)size, f) != (size_t)size) die("cannot read plan");
    text[size] = 0;
    fclose(f);

    plan.mode = M_THROUGHPUT;
    strcpy(plan.path, "/v1/ws");
    plan.seconds = 5; plan.warmup = 1; plan.rate = 1000; plan.hold = 5; plan.drain = 5;
    plan.connect_timeout = 120; plan.depth = 8; plan.login_concurrency = 100;
    st.max_samples = 4000000;
    size_t cap = 0;
    int header = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *words[8];
        int nw = 0;
        char *wsave = NULL;
        for (char *w = strtok_r(line, " \t\r", &wsave); w && nw < 8; w = strtok_r(NULL, " \t\r", &wsave))
            words[nw++] = w;
        if (nw == 0 || words[0][0] == '#') continue;
        const char *k = words[0];
        if (!header) {
            if (strcmp(k, "loadgen-plan") || nw != 2 || strcmp(words[1], "1")) die("not a loadgen plan (v1)");
            header = 1;
            continue;
        }
        if (strcmp(k, "conn") == 0) {
            if (nw != 7) die("conn line needs 6 fields");
            if (plan.nconns == MAX_CONNS) die("too many connections");
            if (plan.nconns == cap) {
                cap = cap ? cap * 2 : 1024;
                plan.conns = xrealloc(plan.conns, cap * sizeof(conn_t));
            }
            conn_t *c = &plan.conns[plan.nconns];
            memset(c, 0, sizeof *c);
            c->fd = -1;
            c->idx = (uint32_t)plan.nconns++;
            c->role = words[1][0] == 'S' ? R_SENDER : words[1][0] == 'R' ? R_RECIPIENT : R_IDLE;
            c->login = parse_hex(words[2], &c->login_len, 16384);
            c->tmpl = parse_hex(words[3], &c->tmpl_len, MAX_TEMPLATE);
            c->id_off = (long)parse_num(words[4], -1, MAX_TEMPLATE, "id offset");
            c->ts_off = (long)parse_num(words[5], -1, MAX_TEMPLATE, "ts offset");
            c->rid_off = (long)parse_num(words[6], -1, MAX_TEMPLATE, "rid offset");
            if (c->role == R_SENDER) {
                /* The fields overwritten per send must lie inside the template. */
                if (c->ts_off < 0 || (size_t)c->ts_off + 16 > c->tmpl_len) die("sender ts offset out of range");
                if (c->id_off >= 0 && (size_t)c->id_off + 16 > c->tmpl_len) die("id offset out of range");
                if (c->rid_off >= 0 && (size_t)c->rid_off + 4 > c->tmpl_len) die("rid offset out of range");
            }
            continue;
        }
        if (nw != 2) die("plan line '%s' needs one value", k);
        const char *v = words[1];
        if (!strcmp(k, "mode")) {
            plan.mode = !strcmp(v, "throughput") ? M_THROUGHPUT : !strcmp(v, "latency") ? M_LATENCY
                      : !strcmp(v, "idle") ? M_IDLE : !strcmp(v, "minimal") ? M_MINIMAL : (die("bad mode %s", v), 0);
        } else if (!strcmp(k, "port")) plan.port = (int)parse_num(v, 1, 65535, k);
        else if (!strcmp(k, "path")) {
            if (strlen(v) >= sizeof plan.path || v[0] != '/') die("bad path");
            strcpy(plan.path, v);
        } else if (!strcmp(k, "seconds")) plan.seconds = parse_num(v, 0.01, 3600, k);
        else if (!strcmp(k, "warmup")) plan.warmup = parse_num(v, 0, 600, k);
        else if (!strcmp(k, "rate")) plan.rate = parse_num(v, 1, 1e7, k);
        else if (!strcmp(k, "hold")) plan.hold = parse_num(v, 0, 3600, k);
        else if (!strcmp(k, "drain")) plan.drain = parse_num(v, 0, 600, k);
        else if (!strcmp(k, "connect_timeout")) plan.connect_timeout = parse_num(v, 1, 3600, k);
        else if (!strcmp(k, "depth")) plan.depth = (long)parse_num(v, 1, 100000, k);
        else if (!strcmp(k, "login_concurrency")) plan.login_concurrency = (long)parse_num(v, 1, 100000, k);
        else if (!strcmp(k, "max_samples")) st.max_samples = (size_t)parse_num(v, 0, 1e9, k);
        else if (!strcmp(k, "samples")) {
            if (strlen(v) >= sizeof plan.samples_path) die("samples path too long");
            strcpy(plan.samples_path, strcmp(v, "-") ? v : "");
        } else if (!strcmp(k, "hello")) plan.hello = parse_hex(v, &plan.hello_len, 16384);
        else if (!strcmp(k, "ack")) plan.ack = parse_hex(v, &plan.ack_len, 4096);
        else die("unknown plan key %s", k);
    }
    free(text);
    if (!header || !plan.port || !plan.nconns) die("plan needs a header, a port and connections");
    if (plan.mode != M_MINIMAL && !plan.hello_len) die("plan needs a hello frame");
    if (plan.mode == M_MINIMAL && !plan.ack_len) die("minimal plan needs an ack frame");
}

/* -- connections: output ------------------------------------------------------------------ */

static int ep;
static uint32_t rng_state = 2463534242u;

/* xorshift32: WebSocket mask keys. The mask only has to exist (RFC 6455 §5.3 requires clients to
 * mask); unpredictability matters for browsers, not for a load generator on loopback. */
static uint32_t rng(void) {
    uint32_t x = rng_state;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    return rng_state = x;
}

static size_t n_ready, n_closed; /* connections that reached S_READY / S_CLOSED */

static void conn_close(conn_t *c, int err) {
    if (c->state == S_CLOSED) return;
    if (err >= 0) st.errors[err]++;
    n_closed++;
    if (c->fd >= 0) { epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); }
    c->fd = -1;
    c->state = S_CLOSED;
    free(c->rbuf.p); free(c->msg.p); free(c->pend.p); free(c->wbuf.p);
    memset(&c->rbuf, 0, sizeof c->rbuf); memset(&c->msg, 0, sizeof c->msg);
    memset(&c->pend, 0, sizeof c->pend); memset(&c->wbuf, 0, sizeof c->wbuf);
}

/* Append one client WebSocket frame (FIN set, masked) carrying `data` to the write buffer. */
static void ws_frame_out(conn_t *c, int opcode, const uint8_t *data, size_t n) {
    uint8_t head[14];
    size_t h = 0;
    head[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) head[h++] = (uint8_t)(0x80 | n);
    else if (n < 65536) { head[h++] = 0x80 | 126; head[h++] = (uint8_t)(n >> 8); head[h++] = (uint8_t)n; }
    else { head[h++] = 0x80 | 127; put_be64(head + h, n); h += 8; }
    uint8_t key[4];
    put_be32(key, rng());
    memcpy(head + h, key, 4);
    h += 4;
    buf_reserve(&c->wbuf, h + n);
    memcpy(c->wbuf.p + c->wbuf.len, head, h);
    uint8_t *out = c->wbuf.p + c->wbuf.len + h;
    /* Mask 8 bytes at a time, then the tail. */
    uint64_t k8;
    uint8_t kb[8] = {key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]};
    memcpy(&k8, kb, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, data + i, 8);
        w ^= k8;
        memcpy(out + i, &w, 8);
    }
    for (; i < n; i++) out[i] = data[i] ^ key[i & 3];
    c->wbuf.len += h + n;
}

static void want_output(conn_t *c, int on) {
    if (c->want_out == on || c->fd < 0) return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u32 = c->idx};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = on;
}

/* Wrap the gathered frames into one message (or pass them raw in minimal mode) and write. */
static void conn_flush(conn_t *c) {
    if (c->state == S_CLOSED) return;
    if (c->pend.len) {
        if (plan.mode == M_MINIMAL) buf_append(&c->wbuf, c->pend.p, c->pend.len);
        else ws_frame_out(c, 0x2, c->pend.p, c->pend.len);
        c->pend.len = 0;
    }
    for (int round = 0; round < 64 && c->wbuf.off < c->wbuf.len; round++) {
        ssize_t n = send(c->fd, c->wbuf.p + c->wbuf.off, c->wbuf.len - c->wbuf.off, MSG_NOSIGNAL);
        if (n > 0) { c->wbuf.off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        conn_close(c, E_CLOSED);
        return;
    }
    if (c->wbuf.off >= c->wbuf.len) {
        c->wbuf.off = c->wbuf.len = 0;
        want_output(c, 0);
    } else {
        if (c->wbuf.len - c->wbuf.off > MAX_WBUF) { conn_close(c, E_OVERFLOW); return; }
        if (c->wbuf.off > (1u << 20)) buf_compact(&c->wbuf);
        want_output(c, 1);
    }
}

static conn_t **dirty_list;
static size_t ndirty;

static void mark_dirty(conn_t *c) {
    if (!c->dirty) { c->dirty = 1; dirty_list[ndirty++] = c; }
}

static void flush_dirty(void) {
    for (size_t i = 0; i < ndirty; i++) {
        dirty_list[i]->dirty = 0;
        conn_flush(dirty_list[i]);
    }
    ndirty = 0;
}

/* Queue one protocol frame; a full message goes out first (frames never span messages). */
static void queue_frame(conn_t *c, const uint8_t *frame, size_t n) {
    if (c->pend.len && c->pend.len + n > MAX_PEND) conn_flush(c);
    if (c->state == S_CLOSED) return;
    buf_append(&c->pend, frame, n);
    mark_dirty(c);
}

static uint32_t run_nonce;

/* One send from a sender's template: fresh message id, rid, timestamp and counter. */
static void queue_send(conn_t *c) {
    if (c->state != S_READY) return;
    if (c->pend.len && c->pend.len + c->tmpl_len > MAX_PEND) conn_flush(c);
    if (c->state == S_CLOSED) return;
    buf_reserve(&c->pend, c->tmpl_len);
    uint8_t *f = c->pend.p + c->pend.len;
    memcpy(f, c->tmpl, c->tmpl_len);
    uint64_t k = c->counter++;
    if (c->id_off >= 0) { /* unique per sending device: run nonce, connection, counter */
        put_be32(f + c->id_off, run_nonce);
        put_be32(f + c->id_off + 4, c->idx);
        put_be64(f + c->id_off + 8, k);
    }
    /* The template's rid is a 4-byte CBOR uint (head 0x1a): keep values in [2^16, 2^32). */
    if (c->rid_off >= 0) put_be32(f + c->rid_off, (uint32_t)(0x10000u + k % 0xfffe0000u));
    put_be64(f + c->ts_off, now_ns());
    put_be64(f + c->ts_off + 8, k);
    c->pend.len += c->tmpl_len;
    c->inflight++;
    st.issued++;
    mark_dirty(c);
}

/* -- CBOR: just enough to read the server's frames ----------------------------------------- */

typedef struct {
    const uint8_t *p, *end;
} cur_t;

/* The head of one data item: major type and argument. Deterministic CBOR has no indefinite
 * lengths (additional info 31) and nothing uses 28-30: both are errors here. */
static int cb_head(cur_t *c, int *major, uint64_t *val) {
    if (c->p >= c->end) return -1;
    uint8_t ib = *c->p++;
    *major = ib >> 5;
    uint8_t ai = ib & 31;
    if (ai < 24) { *val = ai; return 0; }
    if (ai > 27) return -1;
    size_t n = (size_t)1 << (ai - 24);
    if ((size_t)(c->end - c->p) < n) return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v = v << 8 | c->p[i];
    c->p += n;
    *val = v;
    return 0;
}

/* Skip one item of the types the protocol allows (uint, bytes, text, array, map, bool). */
static int cb_skip(cur_t *c, int depth) {
    int major;
    uint64_t v;
    if (depth > 8 || cb_head(c, &major, &v)) return -1;
    switch (major) {
    case 0: return 0;
    case 2: case 3:
        if (v > (uint64_t)(c->end - c->p)) return -1;
        c->p += v;
        return 0;
    case 4: case 5: {
        /* Every item takes at least one byte: a count beyond the bytes left is malformed. */
        if (v > (uint64_t)(c->end - c->p)) return -1;
        uint64_t items = major == 5 ? 2 * v : v;
        for (uint64_t i = 0; i < items; i++)
            if (cb_skip(c, depth + 1)) return -1;
        return 0;
    }
    case 7: return v == 20 || v == 21 ? 0 : -1;
    default: return -1; /* negative ints, tags: never in protocol v1 */
    }
}

static int cb_string(cur_t *c, int want_major, const uint8_t **s, size_t *n) {
    int major;
    uint64_t v;
    if (cb_head(c, &major, &v) || major != want_major || v > (uint64_t)(c->end - c->p)) return -1;
    *s = c->p;
    *n = (size_t)v;
    c->p += v;
    return 0;
}

static int cb_uint(cur_t *c, uint64_t *v) {
    int major;
    return cb_head(c, &major, v) || major != 0 ? -1 : 0;
}

static int key_is(const uint8_t *k, size_t n, const char *name) {
    return strlen(name) == n && memcmp(k, name, n) == 0;
}

/* Append a CBOR uint (shortest form, as deterministic encoding requires). */
static size_t cb_put_head(uint8_t *out, int major, uint64_t v) {
    uint8_t m = (uint8_t)(major << 5);
    if (v < 24) { out[0] = m | (uint8_t)v; return 1; }
    if (v < 0x100) { out[0] = m | 24; out[1] = (uint8_t)v; return 2; }
    if (v < 0x10000) { out[0] = m | 25; out[1] = (uint8_t)(v >> 8); out[2] = (uint8_t)v; return 3; }
    if (v < 0x100000000ull) { out[0] = m | 26; put_be32(out + 1, (uint32_t)v); return 5; }
    out[0] = m | 27; put_be64(out + 1, v); return 9;
}

/* -- protocol ------------------------------------------------------------------------------ */

static uint64_t t_start, t_window, t_deadline; /* 0 until the load starts */

static void record_delivery(const uint8_t *c, size_t n, uint64_t now, conn_t *r) {
    st.delivered_total++;
    int in_window = t_start && now >= t_window && now <= t_deadline;
    if (in_window) st.delivered_window++;
    if (n < 16) return;
    uint64_t sent = get_be64(c), ctr = get_be64(c + 8);
    /* Exactly once and in order: this recipient's only sender counts 0, 1, 2, ... */
    if (ctr < r->next_ctr) st.duplicates++;
    else {
        if (ctr > r->next_ctr) st.gaps++;
        r->next_ctr = ctr + 1;
    }
    if (in_window && sent <= now) {
        if (st.nsamples < st.max_samples) {
            uint64_t us = (now - sent) / 1000;
            st.samples[st.nsamples++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
        } else st.dropped_samples++;
    }
}

/* A `deliver` frame: record each item, answer one `ack` with all its seqs. */
static int handle_deliver(conn_t *c, cur_t items, uint64_t now) {
    int major;
    uint64_t n;
    if (cb_head(&items, &major, &n) || major != 4 || n < 1 || n > MAX_ITEMS) return -1;
    uint64_t seqs[MAX_ITEMS];
    for (uint64_t i = 0; i < n; i++) {
        uint64_t m, seq = 0;
        int have_seq = 0;
        const uint8_t *ct = NULL, *kind = NULL;
        size_t ctn = 0, kindn = 0;
        if (cb_head(&items, &major, &m) || major != 5 || m > 16) return -1;
        for (uint64_t j = 0; j < m; j++) {
            const uint8_t *k;
            size_t kn;
            if (cb_string(&items, 3, &k, &kn)) return -1;
            if (key_is(k, kn, "seq")) { if (cb_uint(&items, &seq)) return -1; have_seq = 1; }
            else if (key_is(k, kn, "c")) { if (cb_string(&items, 2, &ct, &ctn)) return -1; }
            else if (key_is(k, kn, "k")) { if (cb_string(&items, 3, &kind, &kindn)) return -1; }
            else if (cb_skip(&items, 2)) return -1;
        }
        if (!have_seq || !kind) return -1;
        seqs[i] = seq;
        if (key_is(kind, kindn, "msg") && ct) record_delivery(ct, ctn, now, c);
        else st.other_items++;
    }
    /* ack = {"t": "ack", "v": 1, "seqs": [...]}: keys in deterministic order (length, then bytes),
     * exactly as medrelay.protocol encodes it. */
    uint8_t frame[4 + 16 + 3 + MAX_ITEMS * 9];
    size_t p = 4;
    static const uint8_t head[] = {0xa3, 0x61, 't', 0x63, 'a', 'c', 'k', 0x61, 'v', 0x01,
                                   0x64, 's', 'e', 'q', 's'};
    memcpy(frame + p, head, sizeof head);
    p += sizeof head;
    p += cb_put_head(frame + p, 4, n);
    for (uint64_t i = 0; i < n; i++) p += cb_put_head(frame + p, 0, seqs[i]);
    put_be32(frame, (uint32_t)(p - 4));
    queue_frame(c, frame, p);
    st.deliver_frames++;
    st.acks++;
    st.acked_seqs += n;
    return 0;
}

static void start_resume(conn_t *c) {
    queue_frame(c, c->login, c->login_len);
    c->state = S_AUTH;
}

/* One protocol frame body from the server (deterministic CBOR map with "t" and "v"). */
static int handle_body(conn_t *c, const uint8_t *body, size_t len, uint64_t now) {
    cur_t cur = {body, body + len};
    int major;
    uint64_t n;
    if (cb_head(&cur, &major, &n) || major != 5 || n > 32) return E_CBOR;
    const uint8_t *type = NULL, *code = NULL;
    size_t typen = 0, coden = 0;
    int has_rid = 0;
    cur_t items = {NULL, NULL};
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *k;
        size_t kn;
        if (cb_string(&cur, 3, &k, &kn)) return E_CBOR;
        if (key_is(k, kn, "t")) { if (cb_string(&cur, 3, &type, &typen)) return E_CBOR; }
        else if (key_is(k, kn, "code")) { if (cb_string(&cur, 3, &code, &coden)) return E_CBOR; }
        else if (key_is(k, kn, "items")) {
            items.p = cur.p;
            if (cb_skip(&cur, 1)) return E_CBOR;
            items.end = cur.p;
        } else {
            if (key_is(k, kn, "rid")) has_rid = 1;
            if (cb_skip(&cur, 1)) return E_CBOR;
        }
    }
    if (cur.p != cur.end || !type) return E_CBOR;

    if (key_is(type, typen, "error")) {
        st.errors[E_SERVER]++;
        if (code) count_code(code, coden);
        if (c->state != S_READY) return E_UNEXPECTED; /* login refused: the connection is lost */
        if (c->role == R_SENDER && has_rid && c->inflight) { c->inflight--; st.refused++; }
        return -1;
    }
    if (key_is(type, typen, "welcome")) {
        if (c->state != S_WELCOME) return E_UNEXPECTED;
        start_resume(c);
        return -1;
    }
    if (key_is(type, typen, "authenticated")) {
        if (c->state != S_AUTH) return E_UNEXPECTED;
        c->state = S_READY;
        n_ready++;
        return -1;
    }
    if (c->state != S_READY) return E_UNEXPECTED;
    if (key_is(type, typen, "sent")) {
        if (c->role != R_SENDER || !c->inflight) return E_UNEXPECTED;
        c->inflight--;
        st.confirmed++;
        if (plan.mode == M_THROUGHPUT && t_start && now < t_deadline) queue_send(c);
        return -1;
    }
    if (key_is(type, typen, "deliver")) {
        if (!items.p || c->role == R_SENDER) return E_UNEXPECTED;
        return handle_deliver(c, items, now) ? E_CBOR : -1;
    }
    return -1; /* other notices (prekeys_low, ...) are not this benchmark's business */
}

/* One whole binary WebSocket message: one or more whole length-prefixed frames (§1). */
static int handle_ws_message(conn_t *c, const uint8_t *p, size_t n, uint64_t now) {
    for (int frames = 0; n && frames < 100000; frames++) {
        if (n < 4) return E_FRAME;
        uint32_t len = get_be32(p);
        if (len > MAX_FRAME || len > n - 4) return E_FRAME;
        int err = handle_body(c, p + 4, len, now);
        if (err >= 0) return err;
        if (c->state == S_CLOSED) return -1;
        p += 4 + len;
        n -= 4 + len;
    }
    return n ? E_FRAME : -1;
}

/* Minimal relay: a sender gets 8-byte acknowledgements; a recipient gets payloads (and 8-byte
 * acknowledgements of its own acks, ignored). */
static int handle_minimal(conn_t *c, const uint8_t *p, size_t n, uint64_t now, int *delivered) {
    if (c->role == R_SENDER) {
        if (n != 8 || !c->inflight) return E_UNEXPECTED;
        c->inflight--;
        st.confirmed++;
        if (t_start && now < t_deadline) queue_send(c);
    } else if (n > 8) {
        record_delivery(p, n, now, c);
        (*delivered)++;
    }
    return -1;
}

/* Parse what is buffered: the HTTP upgrade answer, then WebSocket frames (or minimal frames). */
static int parse_input(conn_t *c, uint64_t now) {
    buf_t *b = &c->rbuf;
    if (c->state == S_UPGRADE) {
        uint8_t *end = memmem(b->p + b->off, b->len - b->off, "\r\n\r\n", 4);
        if (!end) return b->len - b->off > MAX_HTTP_HEAD ? E_UPGRADE : -1;
        size_t head = (size_t)(end - (b->p + b->off)) + 4;
        if (head < 13 || memcmp(b->p + b->off, "HTTP/1.1 101 ", 13) != 0) return E_UPGRADE;
        b->off += head;
        c->state = S_WELCOME;
        queue_frame(c, plan.hello, plan.hello_len);
    }
    if (plan.mode == M_MINIMAL) {
        int delivered = 0;
        for (int i = 0; i < 100000 && b->len - b->off >= 4; i++) {
            uint32_t len = get_be32(b->p + b->off);
            if (len > MAX_FRAME) return E_FRAME;
            if (b->len - b->off < 4 + (size_t)len) break;
            int err = handle_minimal(c, b->p + b->off + 4, len, now, &delivered);
            if (err >= 0) return err;
            b->off += 4 + len;
        }
        /* One acknowledgement per batch of deliveries read, as a recipient acks a deliver frame. */
        if (delivered) { queue_frame(c, plan.ack, plan.ack_len); st.acks++; st.acked_seqs += delivered; }
        return -1;
    }
    for (int i = 0; i < 100000; i++) {
        size_t avail = b->len - b->off;
        const uint8_t *h = b->p + b->off;
        if (avail < 2) break;
        int fin = h[0] & 0x80, op = h[0] & 0x0f;
        if (h[0] & 0x70) return E_WS;     /* no extensions were negotiated */
        if (h[1] & 0x80) return E_WS;     /* a server never masks */
        uint64_t len = h[1] & 0x7f;
        size_t hl = 2;
        if (len == 126) { if (avail < 4) break; len = (uint64_t)h[2] << 8 | h[3]; hl = 4; }
        else if (len == 127) { if (avail < 10) break; len = get_be64(h + 2); hl = 10; }
        if (len > MAX_WS_MESSAGE) return E_WS;
        if (avail < hl + len) break;
        const uint8_t *payload = h + hl;
        b->off += hl + (size_t)len;
        int err = -1;
        if (op >= 8) {                     /* control frames: whole and short */
            if (!fin || len > 125) return E_WS;
            if (op == 0x9) { ws_frame_out(c, 0xA, payload, (size_t)len); mark_dirty(c); }
            else if (op == 0x8) return t_deadline && now >= t_deadline ? -2 : E_CLOSED;
            else if (op != 0xA) return E_WS;
        } else if (op == 0x2) {
            if (c->in_msg) return E_WS;
            if (fin) err = handle_ws_message(c, payload, (size_t)len, now);
            else { c->in_msg = 1; c->msg.len = 0; buf_append(&c->msg, payload, (size_t)len); }
        } else if (op == 0x0) {            /* continuation of a fragmented message */
            if (!c->in_msg || c->msg.len + len > MAX_WS_MESSAGE) return E_WS;
            buf_append(&c->msg, payload, (size_t)len);
            if (fin) {
                c->in_msg = 0;
                err = handle_ws_message(c, c->msg.p, c->msg.len, now);
                c->msg.len = 0;
            }
        } else return E_WS;                /* text messages are a protocol error (§1) */
        if (err >= 0) return err;
        if (c->state == S_CLOSED) return -1;
    }
    return -1;
}

static void on_readable(conn_t *c, uint64_t now) {
    for (int round = 0; round < 16; round++) {
        buf_t *b = &c->rbuf;
        if (b->off && b->cap - b->len < 16384) buf_compact(b);
        if (b->cap - b->len < 16384) {
            if (b->len + 16384 > MAX_RBUF + 16384) { conn_close(c, E_WS); return; }
            buf_reserve(b, 65536);
        }
        size_t space = b->cap - b->len;
        ssize_t n = recv(c->fd, b->p + b->len, space, 0);
        if (n == 0) { conn_close(c, t_deadline && now >= t_deadline ? -1 : E_CLOSED); return; }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_close(c, E_CLOSED);
            return;
        }
        b->len += (size_t)n;
        int err = parse_input(c, now);
        if (c->state == S_CLOSED) return;
        if (err == -2) { conn_close(c, -1); return; }
        if (err >= 0) { conn_close(c, err); return; }
        buf_compact(b);
        if ((size_t)n < space) break; /* drained; level-triggered epoll tells us if not */
    }
}

/* -- connection set-up --------------------------------------------------------------------- */

static void conn_start(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { c->state = S_CLOSED; st.errors[E_CONNECT]++; return; }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)plan.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* 127.0.0.1 only, always */
    c->state = S_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = c->idx};
    c->want_out = 1;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev)) { conn_close(c, E_CONNECT); return; }
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) conn_close(c, E_CONNECT);
}

static void on_connected(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) || err) { conn_close(c, E_CONNECT); return; }
    if (plan.mode == M_MINIMAL) {
        c->state = S_READY;
        n_ready++;
        queue_frame(c, c->login, c->login_len); /* the 4-byte client id */
        return;
    }
    char req[512];
    /* A fixed key: the server does not care, and we do not check Sec-WebSocket-Accept (no SHA-1
     * here); the status line "101" is what tells us the upgrade happened. */
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", plan.path, plan.port);
    buf_append(&c->wbuf, req, (size_t)n);
    c->state = S_UPGRADE;
    mark_dirty(c);
}

/* -- main loop ----------------------------------------------------------------------------- */

static void handle_events(int timeout_ms, int timer_fd, void (*on_timer)(uint64_t)) {
    static struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, timeout_ms);
    uint64_t now = now_ns();
    for (int i = 0; i < n; i++) {
        if (evs[i].data.u32 == EV_TIMER) {
            uint64_t expirations;
            if (read(timer_fd, &expirations, sizeof expirations) < 0) { /* spurious: fine */ }
            if (on_timer) on_timer(now);
            continue;
        }
        conn_t *c = &plan.conns[evs[i].data.u32];
        if (c->state == S_CLOSED) continue;
        if (c->state == S_CONNECTING) {
            if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
            continue;
        }
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c, now);
        if (c->state != S_CLOSED && (evs[i].events & EPOLLOUT)) mark_dirty(c);
    }
    flush_dirty();
}

static int ms_until(uint64_t t, uint64_t now) {
    if (t <= now) return 0;
    uint64_t ms = (t - now + 999999) / 1000000;
    return ms > 50 ? 50 : (int)ms;
}

static conn_t **senders;
static size_t nsenders, rr_next;
static uint64_t paced_issued;

/* Latency mode: bring the sends issued up to rate x elapsed, round-robin over the senders. */
static void pace(uint64_t now) {
    if (!t_start || now >= t_deadline || !nsenders) return;
    uint64_t due = (uint64_t)((double)(now - t_start) / 1e9 * plan.rate) + 1;
    for (int i = 0; i < 100000 && paced_issued < due; i++) {
        conn_t *c = senders[rr_next++ % nsenders];
        paced_issued++;
        queue_send(c);
    }
}

static int all_quiet(void) {
    for (size_t i = 0; i < plan.nconns; i++) {
        conn_t *c = &plan.conns[i];
        if (c->state != S_CLOSED && (c->wbuf.len > c->wbuf.off || c->pend.len)) return 0;
    }
    return 1;
}

/* sorted[min(n - 1, int(n * q))], the rank rule relay_bench.py uses, in ms. */
static double quantile_ms(double q) {
    size_t i = (size_t)((double)st.nsamples * q);
    return st.samples[i < st.nsamples ? i : st.nsamples - 1] / 1000.0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: loadgen PLAN_FILE\n"); return 2; }
    load_plan(argv[1]);
    run_nonce = (uint32_t)(now_ns() ^ (uint64_t)getpid() << 16);
    rng_state ^= run_nonce | 1;
    if (st.max_samples) st.samples = xrealloc(NULL, st.max_samples * sizeof(uint32_t));
    dirty_list = xrealloc(NULL, plan.nconns * sizeof(conn_t *));
    senders = xrealloc(NULL, plan.nconns * sizeof(conn_t *));
    for (size_t i = 0; i < plan.nconns; i++)
        if (plan.conns[i].role == R_SENDER) senders[nsenders++] = &plan.conns[i];

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < plan.nconns + 32)
        die("need %zu file descriptors, the limit is %llu", plan.nconns + 32,
            (unsigned long long)rl.rlim_cur);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1 failed");

    /* 1. Connect and log in every device, at most login_concurrency at a time. */
    uint64_t t0 = now_ns(), login_deadline = t0 + (uint64_t)(plan.connect_timeout * 1e9);
    size_t next = 0, ready = 0;
    const char *fatal = NULL;
    for (;;) { /* bounded by login_deadline */
        ready = n_ready;
        size_t pending = next - n_ready;
        if (n_closed) { fatal = "a connection failed while logging in"; break; }
        while (next < plan.nconns && pending < (size_t)plan.login_concurrency) {
            conn_start(&plan.conns[next++]);
            pending++;
        }
        flush_dirty();
        if (ready == plan.nconns) break;
        uint64_t now = now_ns();
        if (now >= login_deadline) {
            fatal = "logging in timed out";
            st.errors[E_LOGIN_TIMEOUT] += plan.nconns - ready;
            break;
        }
        handle_events(ms_until(login_deadline, now), -1, NULL);
    }
    ready = n_ready;
    double login_s = (double)(now_ns() - t0) / 1e9;
    if (plan.mode == M_MINIMAL && !fatal) {
        /* The relay does not answer the id frame: give it a moment to register everyone. */
        uint64_t settle = now_ns() + 500000000u;
        for (int i = 0; i < 10000 && now_ns() < settle; i++) handle_events(ms_until(settle, now_ns()), -1, NULL);
    }

    /* 2. The load: warm-up, measurement window, then drain (no new sends) until every send is
     * answered and delivered, or `drain` seconds pass. */
    double cpu0 = cpu_s(), cpu_w0 = 0, cpu_d = 0;
    uint64_t wall_d = 0, t_end = 0;
    int drained = 0, window_seen = 0;
    if (!fatal) {
        t_start = now_ns();
        if (plan.mode == M_IDLE) {
            t_window = t_start;
            t_deadline = t_start + (uint64_t)(plan.hold * 1e9);
        } else {
            t_window = t_start + (uint64_t)(plan.warmup * 1e9);
            t_deadline = t_window + (uint64_t)(plan.seconds * 1e9);
        }
        int timer_fd = -1;
        if (plan.mode == M_LATENCY) {
            timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
            if (timer_fd < 0) die("timerfd_create failed");
            uint64_t period = (uint64_t)(1e9 / plan.rate);
            if (period < 50000) period = 50000; /* at most 20,000 wake-ups/s; pace() catches up */
            struct itimerspec its = {.it_interval = {(time_t)(period / 1000000000u), (long)(period % 1000000000u)},
                                     .it_value = {0, 1}};
            timerfd_settime(timer_fd, 0, &its, NULL);
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_TIMER};
            epoll_ctl(ep, EPOLL_CTL_ADD, timer_fd, &ev);
            pace(t_start);
        } else if (plan.mode == M_THROUGHPUT || plan.mode == M_MINIMAL) {
            for (size_t i = 0; i < nsenders; i++)
                for (long k = 0; k < plan.depth; k++) queue_send(senders[i]);
        }
        flush_dirty();
        uint64_t hard_end = t_deadline + (uint64_t)(plan.drain * 1e9);
        uint64_t linger_until = 0;
        for (;;) {
            uint64_t now = now_ns();
            /* "event" lines let the caller sample the server over exactly the window. */
            if (!window_seen && now >= t_window) {
                window_seen = 1;
                cpu_w0 = cpu_s();
                printf("event window_start\n");
                fflush(stdout);
            }
            if (!wall_d && now >= t_deadline) {
                wall_d = now;
                cpu_d = cpu_s();
                printf("event window_end\n");
                fflush(stdout);
                if (timer_fd >= 0) { close(timer_fd); timer_fd = -1; }
            }
            if (wall_d) {
                if (plan.mode == M_IDLE) break;
                int answered = st.confirmed + st.refused >= st.issued;
                if (!drained && answered && st.delivered_total >= st.confirmed && all_quiet()) {
                    drained = 1;
                    /* Let the server read the last acks before the connections close. */
                    linger_until = now + 200000000u;
                }
                if ((drained && now >= linger_until) || now >= hard_end) break;
            }
            uint64_t wake = !window_seen ? t_window : !wall_d ? t_deadline : drained ? linger_until : hard_end;
            handle_events(ms_until(wake, now), timer_fd, pace);
            if (plan.mode == M_LATENCY) { pace(now_ns()); flush_dirty(); }
        }
        t_end = now_ns();
        if (timer_fd >= 0) close(timer_fd);
    }
    size_t still_open = 0;
    for (size_t i = 0; i < plan.nconns; i++) {
        if (plan.conns[i].state == S_READY) still_open++;
        if (plan.conns[i].fd >= 0) close(plan.conns[i].fd);
    }

    /* 3. Report. */
    double p50 = -1, p90 = -1, p99 = -1, p999 = -1, maxl = -1, mean = -1;
    if (st.nsamples) {
        FILE *f = plan.samples_path[0] ? fopen(plan.samples_path, "wb") : NULL;
        if (f) { fwrite(st.samples, sizeof(uint32_t), st.nsamples, f); fclose(f); }
        else if (plan.samples_path[0]) fprintf(stderr, "loadgen: cannot write %s\n", plan.samples_path);
        qsort(st.samples, st.nsamples, sizeof(uint32_t), cmp_u32);
        size_t n = st.nsamples;
        double sum = 0;
        for (size_t i = 0; i < n; i++) sum += st.samples[i];
        p50 = quantile_ms(0.50);
        p90 = quantile_ms(0.90);
        p99 = quantile_ms(0.99);
        p999 = quantile_ms(0.999);
        maxl = st.samples[n - 1] / 1000.0;
        mean = sum / (double)n / 1000.0;
    }
    uint64_t errors = 0;
    for (int i = 0; i < E_KINDS; i++) errors += st.errors[i];
    double wall = wall_d && t_start ? (double)(wall_d - t_start) / 1e9 : 0;
    double window_wall = wall_d && t_start ? (double)(wall_d - t_window) / 1e9 : 0;
    printf("{\"mode\": \"%s\", \"connections\": %zu, \"ready\": %zu, \"open_at_end\": %zu, "
           "\"login_s\": %.3f,\n",
           plan.mode == M_THROUGHPUT ? "throughput" : plan.mode == M_LATENCY ? "latency"
           : plan.mode == M_IDLE ? "idle" : "minimal", plan.nconns, ready, still_open, login_s);
    printf(" \"delivered\": %llu, \"window_s\": %.3f, \"delivered_total\": %llu, \"issued\": %llu, "
           "\"confirmed\": %llu, \"refused\": %llu, \"duplicates\": %llu, \"gaps\": %llu, "
           "\"other_items\": %llu, \"acks\": %llu, \"acked_seqs\": %llu, \"drained\": %s,\n",
           (unsigned long long)st.delivered_window, plan.mode == M_IDLE ? plan.hold : plan.seconds,
           (unsigned long long)st.delivered_total, (unsigned long long)st.issued,
           (unsigned long long)st.confirmed, (unsigned long long)st.refused,
           (unsigned long long)st.duplicates, (unsigned long long)st.gaps,
           (unsigned long long)st.other_items, (unsigned long long)st.acks,
           (unsigned long long)st.acked_seqs, drained ? "true" : "false");
    printf(" \"cpu_s\": %.4f, \"wall_s\": %.4f, \"window_cpu_s\": %.4f, \"window_wall_s\": %.4f, "
           "\"total_wall_s\": %.4f,\n",
           wall_d ? cpu_d - cpu0 : 0, wall, wall_d && window_seen ? cpu_d - cpu_w0 : 0, window_wall,
           t_end ? (double)(t_end - t0) / 1e9 : 0);
    printf(" \"latency\": {\"count\": %zu, \"dropped\": %zu, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
           "\"p99_ms\": %.4f, \"p999_ms\": %.4f, \"max_ms\": %.4f, \"mean_ms\": %.4f},\n",
           st.nsamples, st.dropped_samples, p50, p90, p99, p999, maxl, mean);
    printf(" \"errors\": %llu, \"error_kinds\": {", (unsigned long long)errors);
    int first = 1;
    for (int i = 0; i < E_KINDS; i++)
        if (st.errors[i]) {
            printf("%s\"%s\": %llu", first ? "" : ", ", ERR_NAMES[i], (unsigned long long)st.errors[i]);
            first = 0;
        }
    printf("}, \"server_errors\": {");
    for (int i = 0; i < st.ncodes; i++)
        printf("%s\"%s\": %llu", i ? ", " : "", st.codes[i], (unsigned long long)st.code_counts[i]);
    printf("}");
    if (fatal) printf(", \"fatal\": \"%s\"", fatal);
    printf("}\n");
    return fatal ? 1 : 0;
}
