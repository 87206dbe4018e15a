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
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

/// Sampled blocks held now.
pub static HELD: AtomicUsize = AtomicUsize::new(0);
/// Samples dropped because their bucket was full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
fn bucket(ptr: usize) -> &'static Bucket {
    // Blocks are 16-byte aligned: multiply the rest by the golden ratio, keep the top bits.
    let h = ((ptr >> 4) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 14);
    &TABLE[h as usize]
}

/// Remembers a sampled block; false when its bucket is full (the sample is dropped).
pub fn insert(ptr: usize, weight: u64) -> bool {
    let b = bucket(ptr);
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
    DROPPED.fetch_add(1, Ordering::Relaxed);
    false
}

/// Forgets `ptr` if it is a sampled block, returning the weight it was reported with.
#[inline(always)]
pub fn remove(ptr: usize) -> Option<u64> {
    if HELD.load(Ordering::Relaxed) == 0 {
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
    }
}
