//! The sampled blocks: a fixed table in the library's own zero-filled data, so that a free
//! recognises a sampled pointer by reading one cache line (its bucket of four slots), and
//! never mistakes another block for one: no block is changed, no header is read, and a block
//! allocated before the library was active is simply not there.
//!
//! Each slot holds a sampled pointer (0 when free) and the weight its sample was reported
//! with (for a `realloc` that fails and keeps the block). A pointer is inserted after the
//! allocator returned it and removed before it goes back to the allocator, so the owner of a
//! block is the only thread that touches its slot; a bucket that is full drops the sample
//! (counted in [`DROPPED`]). When nothing is held, a free reads only [`HELD`].
//!
//! In front of the table, [`FILTER`]: a count of the held pointers per 16-byte granule of the
//! address, modulo 64 KiB (4 KiB of counts, where the table is 1 MiB), so that the free of an
//! unsampled block — nearly every free — reads one byte of a few cache lines that stay hot,
//! near those its neighbours read, instead of a random bucket of a table that does not stay in
//! cache. Measured on the data bridge at 100k frees/s with its leaked samples held: the table
//! lookup on every free was 8.6 % of its CPU; behind a 64 KiB filter 3.4-4.9 %; behind this one
//! 1.2-1.5 % for the whole of `free`. The price: a free looks the table up whenever another
//! held pointer shares its count (about held/4096 of frees: with tens of thousands of samples
//! held, most). A count moves only by one, with compare-and-swap, and sticks at 255 (always
//! looked up then): below that it is exact, so a held pointer's count is never zero.

use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Slots per bucket: 4 × 16 bytes, one cache line.
const WAYS: usize = 4;
/// Buckets: 16384 × 64 bytes = 1 MiB of the library's bss, pages touched as used; 65536
/// sampled blocks held at once (32 GiB of live heap at the default 512 KiB interval).
const BUCKETS: usize = 1 << 14;

#[repr(C, align(64))]
struct Bucket {
    ptrs: [AtomicUsize; WAYS],
    weights: [AtomicU64; WAYS],
}

static TABLE: [Bucket; BUCKETS] = [const {
    Bucket {
        ptrs: [const { AtomicUsize::new(0) }; WAYS],
        weights: [const { AtomicU64::new(0) }; WAYS],
    }
}; BUCKETS];

/// Bits of a block's granule number that index [`FILTER`].
const FILTER_BITS: u32 = 12;

/// Held pointers per 16-byte granule of the address, modulo 64 KiB (sticky at [`STUCK`]).
static FILTER: [AtomicU8; 1 << FILTER_BITS] = [const { AtomicU8::new(0) }; 1 << FILTER_BITS];
const STUCK: u8 = u8::MAX;

/// Sampled blocks held now.
pub static HELD: AtomicUsize = AtomicUsize::new(0);
/// Samples dropped because their bucket was full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Blocks are 16-byte aligned: the rest multiplied by the golden ratio, its top 14 bits.
#[inline(always)]
fn bucket(ptr: usize) -> &'static Bucket {
    let h = ((ptr >> 4) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 14);
    &TABLE[h as usize]
}

/// The filter's count for `ptr`: by its 16-byte granule, unhashed, so that the filter is a
/// shadow of the heap at one byte per 16 (wrapping every 64 KiB) and the frees of neighbouring
/// blocks, which the program touches together, read the same cache line of it.
#[inline(always)]
fn count(ptr: usize) -> &'static AtomicU8 {
    &FILTER[(ptr >> 4) & ((1 << FILTER_BITS) - 1)]
}

/// Moves a filter count one up or one down, unless it is stuck.
fn step(c: &AtomicU8, up: bool) {
    let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match (n, up) {
        (STUCK, _) => None,
        (n, true) => Some(n + 1),
        (0, false) => None,
        (n, false) => Some(n - 1),
    });
}

/// Remembers a sampled block; false when its bucket is full (the sample is dropped).
pub fn insert(ptr: usize, weight: u64) -> bool {
    let b = bucket(ptr);
    // Counted first: whoever frees the block later sees the count before it sees the slot.
    step(count(ptr), true);
    for (slot, w) in b.ptrs.iter().zip(&b.weights) {
        if slot
            .compare_exchange(0, ptr, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            w.store(weight, Ordering::Relaxed);
            HELD.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    step(count(ptr), false);
    DROPPED.fetch_add(1, Ordering::Relaxed);
    false
}

/// Forgets `ptr` if it is a sampled block, returning the weight it was reported with.
#[inline(always)]
pub fn remove(ptr: usize) -> Option<u64> {
    if HELD.load(Ordering::Relaxed) == 0 || count(ptr).load(Ordering::Acquire) == 0 {
        return None;
    }
    remove_slow(ptr)
}

#[inline(never)]
fn remove_slow(ptr: usize) -> Option<u64> {
    let b = bucket(ptr);
    for (slot, w) in b.ptrs.iter().zip(&b.weights) {
        if slot.load(Ordering::Relaxed) == ptr {
            let weight = w.load(Ordering::Relaxed);
            slot.store(0, Ordering::Release);
            step(count(ptr), false);
            HELD.fetch_sub(1, Ordering::Relaxed);
            return Some(weight);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_found_once_and_others_never() {
        let base = 0x7f00_0000_0000usize;
        assert!(insert(base, 512 << 10));
        assert_eq!(remove(base + 16), None);
        assert_eq!(remove(base), Some(512 << 10));
        assert_eq!(remove(base), None);
    }

    #[test]
    fn a_full_bucket_drops_and_counts() {
        // Pointers that share a bucket: same bits where the hash looks.
        let b0 = 0x5500_0000_0000usize;
        let same: Vec<usize> = (1..)
            .map(|i| b0 + i * 16)
            .filter(|p| core::ptr::eq(bucket(*p), bucket(b0)))
            .take(WAYS + 1)
            .collect();
        let dropped = DROPPED.load(Ordering::Relaxed);
        for p in &same[..WAYS] {
            assert!(insert(*p, 1));
        }
        assert!(!insert(same[WAYS], 1));
        assert_eq!(DROPPED.load(Ordering::Relaxed), dropped + 1);
        for p in &same[..WAYS] {
            assert_eq!(remove(*p), Some(1));
        }
        assert_eq!(
            count(same[WAYS]).load(Ordering::Relaxed),
            0,
            "the dropped one uncounted"
        );
    }

    #[test]
    fn the_filter_counts_exactly_and_sticks_at_the_top() {
        // Pointers of one filter count: 64 KiB apart.
        let b0 = 0x5600_0000_0000usize;
        let same: Vec<usize> = (1..)
            .map(|i| b0 + i * (16 << FILTER_BITS))
            .filter(|p| core::ptr::eq(count(*p), count(b0)))
            .take(2)
            .collect();
        let c = count(b0);
        assert!(insert(same[0], 1) && insert(same[1], 1));
        assert_eq!(c.load(Ordering::Relaxed), 2);
        assert_eq!(remove(same[0]), Some(1));
        assert_eq!(c.load(Ordering::Relaxed), 1, "the other is still held");
        assert_eq!(remove(same[1]), Some(1));
        assert_eq!(c.load(Ordering::Relaxed), 0);
        for _ in 0..300 {
            step(c, true);
        }
        for _ in 0..300 {
            step(c, false);
        }
        assert_eq!(c.load(Ordering::Relaxed), STUCK, "stuck: always looked up");
    }
}
