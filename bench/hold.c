/*
 * hold: after DELAY_MS, allocates COUNT blocks of 16..64 bytes from one call site and keeps
 * them all; prints "held COUNT" and waits for SIGTERM/SIGINT. The benchmark's workload for the
 * tracer's own memory with that many outstanding allocations.
 *
 *   hold COUNT DELAY_MS
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

__attribute__((noinline)) static void **hold(long count) {
    void **blocks = calloc((size_t)count, sizeof *blocks);
    for (long i = 0; i < count; i++)
        blocks[i] = malloc(16 + (size_t)(i % 49));
    return blocks;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: hold COUNT DELAY_MS\n");
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    long count = atol(argv[1]), ms = atol(argv[2]);
    struct timespec delay = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&delay, NULL);
    void **blocks = hold(count);
    printf("held %ld\n", count);
    fflush(stdout);
    while (!stop)
        pause();
    (void)blocks;
    return 0;
}
