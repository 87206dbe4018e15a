/*
 * alloc-loop: the benchmark workload. ITERATIONS pairs of malloc(16..4096) + free, made
 * DEPTH frames below main, then prints the nanoseconds per pair (CLOCK_MONOTONIC, the loop
 * only, after a warm-up). Built with frame pointers, so that a frame-pointer walk and an
 * unwind-table walk see the same stack and their costs compare like for like.
 *
 *   alloc-loop ITERATIONS DEPTH [DELAY_MS [HOLD_MS]]
 *
 * DELAY_MS: sleep that long first (so that a tracer attaching by pid is in place).
 * HOLD_MS: and that long after printing (so that the tracer's statistics can still be read).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void *volatile sink;

__attribute__((noinline)) static void churn(long iterations) {
    unsigned x = 12345;
    for (long i = 0; i < iterations; i++) {
        x = x * 1103515245u + 12345u;
        void *p = malloc(16 + (x >> 16) % 4081);
        sink = p;
        free(p);
    }
}

__attribute__((noinline)) static void descend(long iterations, int depth) {
    if (depth > 0)
        descend(iterations, depth - 1);
    else
        churn(iterations);
    sink = &depth;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void sleep_ms(long ms) {
    struct timespec delay = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&delay, NULL);
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: alloc-loop ITERATIONS DEPTH [DELAY_MS [HOLD_MS]]\n");
        return 2;
    }
    long iterations = atol(argv[1]);
    int depth = atoi(argv[2]);
    if (argc >= 4)
        sleep_ms(atol(argv[3]));
    descend(iterations / 10 + 1, depth); /* warm-up */
    double t0 = now_ns();
    descend(iterations, depth);
    double t1 = now_ns();
    printf("%.1f\n", (t1 - t0) / iterations);
    fflush(stdout);
    if (argc == 5)
        sleep_ms(atol(argv[4]));
    return 0;
}
