/*
 * stacks: leaks one block from each of COUNT distinct call stacks (a path of 14 left/right
 * calls below main), prints "leaked COUNT" and waits for SIGTERM/SIGINT. The benchmark's
 * workload for the time from Ctrl-C to a written flamegraph.
 *
 *   stacks COUNT
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define DEPTH 14
#define NOINLINE __attribute__((noinline))

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }
static void *volatile sink;

NOINLINE static void step(int depth, unsigned path);

NOINLINE static void left(int depth, unsigned path) {
    step(depth, path);
    sink = &depth; /* not a tail call: each side keeps its frame */
}

NOINLINE static void right(int depth, unsigned path) {
    step(depth, path);
    sink = &depth;
}

NOINLINE static void step(int depth, unsigned path) {
    if (depth == 0) {
        sink = malloc(32);
        return;
    }
    if (path & 1)
        left(depth - 1, path >> 1);
    else
        right(depth - 1, path >> 1);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: stacks COUNT\n");
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    long count = atol(argv[1]);
    for (long i = 0; i < count; i++)
        step(DEPTH, (unsigned)i);
    printf("leaked %ld\n", count);
    fflush(stdout);
    while (!stop)
        pause();
    return 0;
}
