/*
 * data-bridge: the bundled demo target for bridge-trace.
 *
 * A small service that moves messages from a producer to a consumer through a bounded queue,
 * the way the data bridge of the postmortem did. Every message is allocated through several
 * call sites and allocator functions; a bounded route cache and a session table that fills up
 * then levels off hold memory on purpose (freed at shutdown); and one error path leaks: every
 * Nth message fails its checksum and its dead-letter copy is never freed.
 *
 * The demo knows its own truth: on SIGUSR1, at exit, and (with --truth FILE) in a file, it
 * reports the bytes and allocations it leaked per call site, as "site bytes count" lines.
 *
 * Usage: data-bridge [--messages N] [--rate PER_SEC] [--leak-every K] [--truth FILE]
 *   --messages 0 (the default) runs until SIGTERM/SIGINT, like a service.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define QUEUE_CAP 256
#define CACHE_CAP 64
#define NOINLINE __attribute__((noinline))

struct message {
    uint64_t id;
    char *topic;
    uint8_t *payload;
    size_t len;
};

/* ---- truth: what this process leaked, per call site ---- */
static pthread_mutex_t truth_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t leaked_bytes, leaked_count;
static const char *truth_path;
static volatile sig_atomic_t stop_requested, truth_requested;

static void write_truth(FILE *out) {
    pthread_mutex_lock(&truth_lock);
    fprintf(out, "reject_message %llu %llu\n", (unsigned long long)leaked_bytes,
            (unsigned long long)leaked_count);
    pthread_mutex_unlock(&truth_lock);
    fflush(out);
}

/* ---- a bounded queue between producer and consumer ---- */
static struct message *queue[QUEUE_CAP];
static size_t q_head, q_len;
static int q_closed;
static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_not_empty = PTHREAD_COND_INITIALIZER, q_not_full = PTHREAD_COND_INITIALIZER;

static void enqueue(struct message *m) {
    pthread_mutex_lock(&q_lock);
    while (q_len == QUEUE_CAP) pthread_cond_wait(&q_not_full, &q_lock);
    queue[(q_head + q_len++) % QUEUE_CAP] = m;
    pthread_cond_signal(&q_not_empty);
    pthread_mutex_unlock(&q_lock);
}

static struct message *dequeue(void) {
    pthread_mutex_lock(&q_lock);
    while (q_len == 0 && !q_closed) pthread_cond_wait(&q_not_empty, &q_lock);
    struct message *m = NULL;
    if (q_len > 0) {
        m = queue[q_head];
        q_head = (q_head + 1) % QUEUE_CAP;
        q_len--;
        pthread_cond_signal(&q_not_full);
    }
    pthread_mutex_unlock(&q_lock);
    return m;
}

static void close_queue(void) {
    pthread_mutex_lock(&q_lock);
    q_closed = 1;
    pthread_cond_broadcast(&q_not_empty);
    pthread_mutex_unlock(&q_lock);
}

/* ---- the producer side: building messages ---- */
static const char *topics[] = {"orders", "payments", "inventory", "shipping", "audit", "metrics"};

static NOINLINE char *topic_for(uint64_t id) {
    char buf[64];
    snprintf(buf, sizeof buf, "%s.%llu", topics[id % 6], (unsigned long long)(id % 97));
    return strdup(buf);
}

static NOINLINE uint8_t *payload_new(uint64_t id, size_t len) {
    uint8_t *p = calloc(len, 1);
    for (size_t i = 0; i < len; i += 64) p[i] = (uint8_t)(id + i);
    return p;
}

static NOINLINE struct message *message_new(uint64_t id) {
    struct message *m = malloc(sizeof *m);
    m->id = id;
    m->len = 64 + (id * 7919) % 4033; /* 64..4096 bytes */
    m->topic = topic_for(id);
    m->payload = payload_new(id, m->len);
    return m;
}

static void message_free(struct message *m) {
    free(m->payload);
    free(m->topic);
    free(m);
}

/* ---- the consumer side ---- */

/* Decoding grows a frame buffer with realloc, like a streaming parser. */
static NOINLINE uint32_t decode_frame(const struct message *m) {
    size_t cap = 32, used = 0;
    uint8_t *frame = malloc(cap);
    for (size_t i = 0; i < m->len; i += 128) {
        if (used + 128 > cap) {
            while (used + 128 > cap) cap *= 2;
            frame = realloc(frame, cap);
        }
        memcpy(frame + used, m->payload + i, m->len - i < 128 ? m->len - i : 128);
        used += 128;
    }
    uint32_t sum = 0;
    for (size_t i = 0; i < used && i < m->len; i++) sum += frame[i];
    free(frame);
    return sum;
}

/* A bounded cache of routes: long-lived on purpose, never more than CACHE_CAP entries. */
struct route {
    char *topic;
    uint64_t hits;
    struct route *next;
};
static struct route *cache;
static size_t cache_len;

static NOINLINE struct route *route_new(const char *topic) {
    struct route *r = malloc(sizeof *r);
    r->topic = strdup(topic);
    r->hits = 0;
    r->next = NULL;
    return r;
}

static void cache_evict_oldest(void) {
    struct route **pp = &cache;
    while (*pp && (*pp)->next) pp = &(*pp)->next;
    struct route *r = *pp;
    *pp = NULL;
    free(r->topic);
    free(r);
    cache_len--;
}

static NOINLINE struct route *cache_lookup(const char *topic) {
    for (struct route *r = cache; r; r = r->next)
        if (strcmp(r->topic, topic) == 0) return r;
    if (cache_len == CACHE_CAP) cache_evict_oldest();
    struct route *r = route_new(topic);
    r->next = cache;
    cache = r;
    cache_len++;
    return r;
}

static void cache_clear(void) {
    while (cache_len) cache_evict_oldest();
}

/* Encrypting needs an aligned scratch buffer. */
static NOINLINE void encrypt_and_forward(const struct message *m) {
    void *scratch = NULL;
    if (posix_memalign(&scratch, 64, m->len) != 0) return;
    memcpy(scratch, m->payload, m->len);
    ((volatile uint8_t *)scratch)[0] ^= 0x5a;
    free(scratch);
}

/* THE LEAK: a message that fails its checksum gets a dead-letter copy for the error log,
 * and nobody frees that copy. */
static struct message *volatile dead_letters_tail; /* only the last one is remembered */

static NOINLINE void reject_message(const struct message *m) {
    struct message *copy = malloc(sizeof *copy + m->len);
    memcpy(copy, m, sizeof *copy);
    memcpy((uint8_t *)(copy + 1), m->payload, m->len);
    dead_letters_tail = copy; /* the previous copy is lost here */
    pthread_mutex_lock(&truth_lock);
    leaked_bytes += sizeof *copy + m->len;
    leaked_count += 1;
    pthread_mutex_unlock(&truth_lock);
}

/* Sessions: one per 4 consecutive messages until the table is full, then reused: a cache
 * that fills (SESSIONS * SESSION_BYTES bytes) and levels off. */
#define SESSIONS 1024
#define SESSION_BYTES 1024
static uint8_t *sessions[SESSIONS];

static NOINLINE uint8_t *session_for(uint64_t id) {
    uint8_t **slot = &sessions[(id / 4) % SESSIONS];
    if (!*slot) *slot = calloc(SESSION_BYTES, 1);
    return *slot;
}

static void sessions_clear(void) {
    for (size_t i = 0; i < SESSIONS; i++) {
        free(sessions[i]);
        sessions[i] = NULL;
    }
}

static uint64_t leak_every = 50;

static NOINLINE void handle_message(struct message *m) {
    uint32_t sum = decode_frame(m);
    struct route *r = cache_lookup(m->topic);
    r->hits++;
    session_for(m->id)[m->id % SESSION_BYTES]++;
    if (m->id % leak_every == leak_every - 1 && (sum & 1) == (sum & 1)) {
        reject_message(m);
    } else {
        encrypt_and_forward(m);
    }
    message_free(m);
}

static void *consumer(void *arg) {
    (void)arg;
    struct message *m;
    while ((m = dequeue())) handle_message(m);
    return NULL;
}

static uint64_t messages, rate = 2000;

static void *producer(void *arg) {
    (void)arg;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (uint64_t id = 0; (messages == 0 || id < messages) && !stop_requested; id++) {
        enqueue(message_new(id));
        if (rate && id % 16 == 15) {
            /* pace to `rate` messages per second */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            double elapsed = (now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9;
            double due = (double)(id + 1) / (double)rate;
            if (due > elapsed) usleep((useconds_t)((due - elapsed) * 1e6));
        }
        if (truth_requested) {
            truth_requested = 0;
            write_truth(stderr);
        }
    }
    close_queue();
    return NULL;
}

static void on_stop(int sig) { (void)sig; stop_requested = 1; }
static void on_usr1(int sig) { (void)sig; truth_requested = 1; }

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--messages") && i + 1 < argc) messages = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--leak-every") && i + 1 < argc) leak_every = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--truth") && i + 1 < argc) truth_path = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--messages N] [--rate PER_SEC] [--leak-every K] [--truth FILE]\n", argv[0]);
            return 2;
        }
    }
    if (leak_every == 0) leak_every = 1;
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    signal(SIGUSR1, on_usr1);
    fprintf(stderr, "data-bridge: pid %d, %s messages at %llu/s, leaking every %llu\n", getpid(),
            messages ? "bounded" : "unbounded", (unsigned long long)rate, (unsigned long long)leak_every);

    pthread_t prod, cons;
    pthread_create(&cons, NULL, consumer, NULL);
    pthread_create(&prod, NULL, producer, NULL);
    pthread_join(prod, NULL);
    pthread_join(cons, NULL);
    cache_clear(); /* a clean shutdown frees the caches: what remains is the leak */
    sessions_clear();

    if (truth_path) {
        FILE *f = fopen(truth_path, "w");
        if (f) {
            write_truth(f);
            fclose(f);
        }
    }
    fprintf(stderr, "data-bridge: done; leaked %llu bytes in %llu allocations at reject_message\n",
            (unsigned long long)leaked_bytes, (unsigned long long)leaked_count);
    return 0;
}
