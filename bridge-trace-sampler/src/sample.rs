//! Which allocations are sampled: a Poisson process over allocated bytes, as jemalloc and
//! tcmalloc sample. Each thread counts down the bytes to its next sample point (initial-exec
//! TLS: a decrement and a predicted branch); an allocation that reaches it is sampled with a
//! weight of `mean × sample points it crossed`, the unbiased bytes it stands for, and the
//! distance to the next point is a fresh exponential draw.
use core::{
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
};

/// Mean bytes between samples when `BRIDGE_TRACE_SAMPLE_INTERVAL` does not say (jemalloc's).
pub const DEFAULT_MEAN: u64 = 512 << 10;
/// More sample points than this in one allocation are counted, not drawn one by one.
const MAX_DRAWS: u64 = 64;

/// The mean interval in bytes; 0 until [`configure`] ran.
static MEAN: AtomicU64 = AtomicU64::new(0);

/// This thread's sampling state, zero-filled at the thread's start.
#[repr(C)]
struct ThreadState {
    /// Bytes still to be allocated by this thread before its next sample point; 0 or less:
    /// this allocation reaches it (0 also before the first draw).
    left: Cell<i64>,
    /// This thread's xorshift state; 0 before it was seeded.
    rng: Cell<u64>,
}

// The state lives in the library's static TLS block, reached by the initial-exec model: the
// thread pointer plus an offset the dynamic loader wrote in the GOT at load. Stable Rust's
// `thread_local!` in a shared library is general-dynamic (a call to `__tls_get_addr` on every
// allocation: measured 0.5 % of the data bridge's CPU while traced); the attribute or flag that
// selects the model is unstable, so the variable and its access are written here. Preloaded,
// the library's TLS is static; a library dlopened later takes the block from glibc's surplus
// of static TLS (16 bytes here).
core::arch::global_asm!(
    // Global for the other codegen units of this crate, hidden from every other object.
    ".globl bridge_trace_sampler_thread",
    ".hidden bridge_trace_sampler_thread",
    ".type bridge_trace_sampler_thread, @tls_object",
    ".size bridge_trace_sampler_thread, 16",
    ".pushsection .tbss,\"awT\",@nobits",
    ".balign 8",
    "bridge_trace_sampler_thread:",
    ".zero 16",
    ".popsection",
);

/// This thread's state.
#[inline(always)]
fn state() -> &'static ThreadState {
    let at: usize;
    // SAFETY: %fs:0 holds the thread pointer (x86-64 TLS ABI); the GOT entry holds the
    // variable's offset from it, which the dynamic loader filled in before any code ran. The
    // state is this thread's alone, zero-filled as a `ThreadState` of zeros is valid; the
    // reference never leaves the thread (it is used within one call of the allocator).
    unsafe {
        core::arch::asm!(
            "mov {at}, qword ptr fs:[0]",
            "add {at}, qword ptr [rip + bridge_trace_sampler_thread@GOTTPOFF]",
            at = out(reg) at,
            options(nostack, pure, readonly),
        );
        &*(at as *const ThreadState)
    }
}

/// Reads the mean from the environment (`BRIDGE_TRACE_SAMPLE_INTERVAL`: bytes, or with a
/// K/M/G suffix, powers of 1024). Allocation-free: runs inside the first malloc.
pub fn configure(value: Option<&[u8]>) {
    let mean = value.and_then(parse_bytes).unwrap_or(DEFAULT_MEAN).max(1);
    MEAN.store(mean, Ordering::Relaxed);
}

/// Sets the mean interval (bytes, at least 1: every allocation) of an injected library.
pub fn set_mean(mean: u64) {
    MEAN.store(mean.max(1), Ordering::Relaxed);
}

/// Reads `BRIDGE_TRACE_SAMPLE_MOVE` (see [`on_mark`]).
pub fn configure_moves(moves: Option<&[u8]>) {
    let moves = match moves {
        Some(b"1") => 1,
        Some(b"0") => 2,
        _ => 0,
    };
    MOVE.store(moves, Ordering::Relaxed);
}

/// The shortest mean interval at which sampled blocks are moved to a [`crate::table::MARK`]:
/// the move costs up to a mark's worth of slack per held sample, 6 % of the heap it stands
/// for here and 0.8 % at the default.
const MARK_MIN_MEAN: u64 = 64 << 10;

/// `BRIDGE_TRACE_SAMPLE_MOVE`: 0 unset (by the interval), 1 always, 2 never.
static MOVE: AtomicU64 = AtomicU64::new(0);

/// Whether sampled blocks are moved to a mark (see [`crate::table`]): from a mean interval of
/// [`MARK_MIN_MEAN`] up, unless `BRIDGE_TRACE_SAMPLE_MOVE` says `1` (always) or `0` (never).
#[inline(always)]
pub fn on_mark() -> bool {
    match MOVE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => mean() >= MARK_MIN_MEAN,
    }
}

pub fn mean() -> u64 {
    match MEAN.load(Ordering::Relaxed) {
        0 => DEFAULT_MEAN,
        m => m,
    }
}

fn parse_bytes(s: &[u8]) -> Option<u64> {
    let (digits, unit) = match s.iter().position(|c| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, &b""[..]),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    let shift = match unit {
        b"" | b"B" => 0,
        b"K" | b"KiB" | b"k" => 10,
        b"M" | b"MiB" => 20,
        b"G" | b"GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Counts an allocation of `size` bytes down: whether it reached a sample point, in which case
/// [`weigh`] must come next (on this thread, before its next allocation). The hot path.
#[inline(always)]
pub fn reached(size: usize) -> bool {
    let left = &state().left;
    let l = left
        .get()
        .saturating_sub(size.min(i64::MAX as usize) as i64);
    left.set(l);
    l <= 0
}

/// The weight of the allocation that [`reached`] a sample point (`None`: the thread's first
/// draw put its point further), and the distance to the next point drawn.
#[inline(always)]
pub fn weigh() -> Option<u64> {
    let left = &state().left;
    crossed(left, left.get())
}

/// The slow path: the countdown reached (or passed) a sample point, `over` bytes ago (≤ 0).
#[cold]
#[inline(never)]
fn crossed(left: &Cell<i64>, over: i64) -> Option<u64> {
    let mean = mean();
    if mean == 1 {
        // Every allocation (`record --inject`): each one stands for its own bytes, exactly.
        left.set(0);
        return Some(over.unsigned_abs());
    }
    let first = state().rng.get() == 0;
    let mut past = -over as u64;
    if first {
        // Not drawn yet: the thread's first sample point is a draw from its first byte.
        let next = draw(mean);
        let size = past;
        if next > size {
            left.set((next - size) as i64);
            return None;
        }
        past = size - next;
    }
    let mut points = 1u64;
    loop {
        if points >= MAX_DRAWS {
            // A huge allocation: the points in the rest of it are about rest / mean.
            points += past / mean;
            past %= mean;
        }
        let next = draw(mean);
        if next > past {
            left.set((next - past) as i64);
            break;
        }
        past -= next;
        points += 1;
    }
    Some(points.saturating_mul(mean))
}

/// An exponential draw with mean `mean` bytes, at least 1.
fn draw(mean: u64) -> u64 {
    let r = &state().rng;
    let mut x = r.get();
    if x == 0 {
        // Seed from where this thread's TLS is and the time stamp counter.
        x = (r as *const Cell<u64> as u64) ^ tsc() ^ 0x9E37_79B9_7F4A_7C15;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r.set(x.max(1));
    let u = x;
    // (0, 1]: 53 random bits.
    let unit = ((u >> 11) + 1) as f64 / (1u64 << 53) as f64;
    ((-unit.ln()) * mean as f64).max(1.0) as u64
}

fn tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes(b"4096"), Some(4096));
        assert_eq!(parse_bytes(b"512K"), Some(512 << 10));
        assert_eq!(parse_bytes(b"2MiB"), Some(2 << 20));
        assert_eq!(parse_bytes(b"1G"), Some(1 << 30));
        assert_eq!(parse_bytes(b"x"), None);
        assert_eq!(parse_bytes(b"12Q"), None);
        assert_eq!(parse_bytes(b"99999999999999999999"), None);
    }

    /// The weights add up to the bytes allocated, for small and for huge allocations.
    #[test]
    fn weights_are_unbiased() {
        let _g = crate::TEST_GLOBALS.lock().unwrap();
        configure(Some(b"4K"));
        for size in [48usize, 4000, 300_000, 20 << 20] {
            // At least ~20000 sample points each: 5 % is over 7 standard deviations.
            let n = (20_000 * 4096 / size).max(200);
            let total: u64 = (0..n)
                .filter_map(|_| reached(size).then(weigh).flatten())
                .sum();
            let truth = (size * n) as f64;
            let err = (total as f64 - truth).abs() / truth;
            assert!(
                err < 0.05,
                "size {size}: weights {total} for {truth} bytes ({err:.3})"
            );
        }
    }
}
