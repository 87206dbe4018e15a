//! The sampled blocks: a fixed table in the library's own zero-filled data, so that a free
//! recognises a sampled pointer by reading one cache line (its bucket of four slots), and
//! never mistakes another block for one: no block is changed, no header is read, and a block
//! allocated before the library was active is simply not there.
//!
//! Each slot holds a sampled pointer (0 when free), the weight its sample was reported with
//! (for a `realloc` that fails and keeps the block) and the usable size the program is told
//! (the allocator's answer for the block it asked for, see [`MARK`]). A pointer is inserted
//! after the allocator returned it and removed before it goes back to the allocator, so the
//! owner of a block is the only thread that touches its slot; a bucket that is full drops the
//! sample (counted in [`DROPPED`]). When nothing is held, a free reads only [`HELD`].
//!
//! Sampled blocks start at a multiple of [`MARK`] (4 KiB; the library moves them there), so
//! that while every held sample does, the free of any other pointer is rejected by its low
//! bits, with the load of [`HELD`] it makes anyway: no other memory is read. Measured on the
//! data bridge at 100k frees/s with its leaked samples held, the filter below cost ~15 ns a
//! free (86 % of the library's `free` on one load). Held samples off a mark (blocks above
//! [`MOVE_LIMIT`], which stay where the allocator put them: glibc maps those 16 bytes into a
//! page; or an interval too short to pay the slack) are counted in the high half of [`HELD`]
//! and by where they start in their page ([`OFFSETS`], 1 KiB that stays in cache): while
//! there are any, a free at an offset some of them share goes on to the filter, as before.
//!
//! The filter, [`FILTER`]: a count of the held pointers per 16-byte granule of the address
//! (per page for a pointer on a [`MARK`]), modulo 64 KiB granules (4 KiB of counts, where the
//! table is 2 MiB), so that the free of an unsampled block reads one byte of a few cache lines
//! that stay hot, near those its neighbours read, instead of a random bucket of a table that
//! does not stay in cache. Measured on the data bridge at 100k frees/s with its leaked samples
//! held: the table lookup on every free was 8.6 % of its CPU; behind a 64 KiB filter
//! 3.4-4.9 %; behind this one 1.2-1.5 % for the whole of `free`. The price: a free looks the
//! table up whenever another held pointer shares its count (about held/4096 of frees: with
//! tens of thousands of samples held, most). A count moves only by one, with compare-and-swap,
//! and sticks at 255 (always looked up then): below that it is exact, so a held pointer's
//! count is never zero.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Slots per bucket: 4 × 16 bytes, one cache line.
const WAYS: usize = 4;
/// Buckets: 16384 × 128 bytes = 2 MiB of the library's bss, pages touched as used; 65536
/// sampled blocks held at once (32 GiB of live heap at the default 512 KiB interval).
const BUCKETS: usize = 1 << 14;

/// Where sampled blocks start: a free of a pointer off it is not a sample's while all held
/// samples are on it.
pub const MARK: usize = 4096;
/// The largest sampled block that is moved to a [`MARK`]: above this a sample stays where the
/// allocator put it (a calloc's fresh pages are not touched, a realloc not copied, and where
/// a big block sits decides where its next realloc goes, and the usable size it has then).
pub const MOVE_LIMIT: usize = 64 << 10;

/// Pointers first: a lookup reads the first cache line only.
#[repr(C, align(64))]
struct Bucket {
    ptrs: [AtomicUsize; WAYS],
    weights: [AtomicU64; WAYS],
    usable: [AtomicUsize; WAYS],
}

static TABLE: [Bucket; BUCKETS] = [const {
    Bucket {
        ptrs: [const { AtomicUsize::new(0) }; WAYS],
        weights: [const { AtomicU64::new(0) }; WAYS],
        usable: [const { AtomicUsize::new(0) }; WAYS],
    }
}; BUCKETS];

/// Bits of a block's granule number that index [`FILTER`].
const FILTER_BITS: u32 = 12;

/// Held pointers per 16-byte granule of the address, modulo 64 KiB (sticky at [`STUCK`]).
static FILTER: [AtomicU8; 1 << FILTER_BITS] = [const { AtomicU8::new(0) }; 1 << FILTER_BITS];
const STUCK: u8 = u8::MAX;

/// Sampled blocks held now: all of them in the low 32 bits, those off a [`MARK`] in the high.
static HELD: AtomicU64 = AtomicU64::new(0);
const OFF_MARK: u64 = 1 << 32;

/// Held samples off a [`MARK`], by where they start in their page (16-byte steps; the first
/// count, for those on one, unused).
static OFFSETS: [AtomicU32; MARK / 16] = [const { AtomicU32::new(0) }; MARK / 16];

#[inline(always)]
fn offset(ptr: usize) -> &'static AtomicU32 {
    &OFFSETS[(ptr & (MARK - 1)) >> 4]
}
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
/// blocks, which the program touches together, read the same cache line of it; by its page
/// when it is on a [`MARK`] (whose granule numbers would share 16 counts).
#[inline(always)]
fn count(ptr: usize) -> &'static AtomicU8 {
    let granule = if ptr & (MARK - 1) == 0 {
        ptr >> 12
    } else {
        ptr >> 4
    };
    &FILTER[granule & ((1 << FILTER_BITS) - 1)]
}

/// Whether `ptr` may be a held sample: from [`HELD`] and its low bits, then where it starts
/// in its page ([`OFFSETS`]) if it is off a mark, then [`FILTER`].
#[inline(always)]
pub fn maybe_held(ptr: usize) -> bool {
    let held = HELD.load(Ordering::Relaxed);
    if held == 0 {
        return false;
    }
    if ptr & (MARK - 1) != 0 && (held < OFF_MARK || offset(ptr).load(Ordering::Acquire) == 0) {
        return false;
    }
    count(ptr).load(Ordering::Acquire) != 0
}

/// Counts `ptr` in (`up`) or out of [`HELD`] and, off a mark, [`OFFSETS`]; in before the
/// block is handed out, out before the allocator gets it back.
fn hold(ptr: usize, up: bool) {
    let on = ptr & (MARK - 1) == 0;
    let unit = if on { 1 } else { 1 + OFF_MARK };
    if up {
        if !on {
            offset(ptr).fetch_add(1, Ordering::AcqRel);
        }
        HELD.fetch_add(unit, Ordering::AcqRel);
    } else {
        HELD.fetch_sub(unit, Ordering::AcqRel);
        if !on {
            offset(ptr).fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The sampled blocks held now.
#[cfg(test)]
fn held() -> (u64, u64) {
    let h = HELD.load(Ordering::Relaxed);
    (h & (OFF_MARK - 1), h >> 32)
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

/// Remembers a sampled block, the weight it was reported with and the usable size the
/// program is told; false when its bucket is full (the sample is dropped).
pub fn insert(ptr: usize, weight: u64, usable: usize) -> bool {
    let b = bucket(ptr);
    // Counted first: whoever frees the block later sees the count before it sees the slot.
    step(count(ptr), true);
    for (i, slot) in b.ptrs.iter().enumerate() {
        if slot
            .compare_exchange(0, ptr, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            b.weights[i].store(weight, Ordering::Relaxed);
            b.usable[i].store(usable, Ordering::Relaxed);
            hold(ptr, true);
            return true;
        }
    }
    step(count(ptr), false);
    DROPPED.fetch_add(1, Ordering::Relaxed);
    false
}

/// A held sample's weight and the usable size the program was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub weight: u64,
    pub usable: usize,
}

/// Forgets `ptr` if it is a sampled block, returning what it was held with.
#[inline(always)]
pub fn remove(ptr: usize) -> Option<Held> {
    if !maybe_held(ptr) {
        return None;
    }
    remove_slow(ptr)
}

#[inline(never)]
fn remove_slow(ptr: usize) -> Option<Held> {
    let (b, i) = find(ptr)?;
    let held = Held {
        weight: b.weights[i].load(Ordering::Relaxed),
        usable: b.usable[i].load(Ordering::Relaxed),
    };
    b.ptrs[i].store(0, Ordering::Release);
    step(count(ptr), false);
    hold(ptr, false);
    Some(held)
}

/// The usable size the program was told for `ptr`, if it is a sampled block.
#[inline(always)]
pub fn usable(ptr: usize) -> Option<usize> {
    if !maybe_held(ptr) {
        return None;
    }
    usable_slow(ptr)
}

#[inline(never)]
fn usable_slow(ptr: usize) -> Option<usize> {
    let (b, i) = find(ptr)?;
    Some(b.usable[i].load(Ordering::Relaxed))
}

/// The bucket and slot that hold `ptr`, if it is held.
fn find(ptr: usize) -> Option<(&'static Bucket, usize)> {
    let b = bucket(ptr);
    let i = b
        .ptrs
        .iter()
        .position(|slot| slot.load(Ordering::Relaxed) == ptr)?;
    Some((b, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_found_once_and_others_never() {
        let base = 0x7f00_0000_0000usize;
        assert!(insert(base, 512 << 10, 0));
        assert_eq!(remove(base + 16), None);
        assert_eq!(remove(base).map(|h| h.weight), Some(512 << 10));
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
            assert!(insert(*p, 1, 0));
        }
        assert!(!insert(same[WAYS], 1, 0));
        assert_eq!(DROPPED.load(Ordering::Relaxed), dropped + 1);
        for p in &same[..WAYS] {
            assert_eq!(remove(*p).map(|h| h.weight), Some(1));
        }
        assert_eq!(
            count(same[WAYS]).load(Ordering::Relaxed),
            0,
            "the dropped one uncounted"
        );
    }

    /// While every held sample is on a mark, other pointers are rejected before the filter;
    /// a sample off one (a big calloc) is found all the same, and the usable size said.
    #[test]
    fn samples_on_and_off_the_mark_are_found() {
        let on = 0x5700_0000_0000usize;
        let off = 0x5700_0000_1010usize;
        assert!(insert(on, 7, 40));
        assert_eq!(usable(on), Some(40));
        assert_eq!(usable(on + 16), None);
        assert!(held().0 >= 1);
        assert!(insert(off, 9, 200_000));
        assert!(held().1 >= 1, "counted off the mark");
        assert!(offset(off).load(Ordering::Relaxed) >= 1);
        assert_eq!(usable(off + 16), None, "another offset: rejected");
        assert_eq!(usable(off), Some(200_000));
        assert_eq!(
            remove(off),
            Some(Held {
                weight: 9,
                usable: 200_000
            })
        );
        assert_eq!(remove(off), None);
        assert_eq!(remove(on).map(|h| h.usable), Some(40));
        assert_eq!(usable(on), None);
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
        assert!(insert(same[0], 1, 0) && insert(same[1], 1, 0));
        assert_eq!(c.load(Ordering::Relaxed), 2);
        assert_eq!(remove(same[0]).map(|h| h.weight), Some(1));
        assert_eq!(c.load(Ordering::Relaxed), 1, "the other is still held");
        assert_eq!(remove(same[1]).map(|h| h.weight), Some(1));
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
