//! The provided-buffer ring for receives (IORING_REGISTER_PBUF_RING), so that an idle
//! connection holds no receive buffer: the kernel picks a buffer only when bytes arrive.
//!
//! # When a buffer belongs to the kernel
//!
//! This is the one statement of the ownership rules; every `unsafe` block in `ring/` points here.
//!
//! - **Provided (receive) buffers**: a buffer belongs to the kernel from the moment its entry is
//!   published in this ring (the release store of the tail in `publish`) until a receive
//!   completion names its buffer id. From then on it belongs to the worker, which may read the
//!   `len` bytes the completion reported, until it calls `recycle(bid)`. A recycled buffer then
//!   waits on the spare stack, untouched, until `top_up` publishes it again. The worker never
//!   writes into a provided buffer. The memory (`ring` entries and `data`) is allocated once,
//!   never moves, and is freed only after the buffer ring has been unregistered or the io_uring
//!   instance closed (`Ring` drops its `IoUring` first).
//! - **Op buffers** (send data, write data, paths, iovecs, the eventfd counter): they live inside
//!   the `Op` value, which `Ring::push` moves into the ring's in-flight table. The kernel may read
//!   or write them from the push until the op's final completion (for multishot ops: the
//!   completion without IORING_CQE_F_MORE); only then is the `Op` handed back. Heap buffers
//!   (`Vec`, `Box`, `CString`) do not move when the table grows, so their addresses stay valid.
//!
//! # Keeping the buffers in cache
//!
//! The kernel takes published buffers in the order they were published. With every buffer
//! published, each one comes back into use only after all the others: a worker receiving large
//! messages then writes each 64 KiB receive into memory it last touched megabytes ago, long
//! evicted from the core's cache, and the kernel's copy pays for fetching every line first
//! (shape (c) of benches/compare.sh, 100 KB messages: that copy was 11-12% of the server's CPU
//! with all 128 buffers published, 8-9% with a warm set, BENCHMARKS.md). So only about as many
//! buffers are published as the kernel has lately taken between two turns of the worker loop
//! (`depth`, twice the decaying peak and at least `MIN_DEPTH`); the rest wait on a stack, the
//! most recently recycled, still cached, on top and published first. A turn whose receives take
//! every published buffer (the last of them then fails with ENOBUFS and is re-armed) counts at
//! least `depth` taken, so the next `top_up` publishes at least twice as many; publishing all at
//! once instead would send the kernel through every cold buffer again. ENOBUFS with no buffer
//! held back is the real overload (`short` tells the two apart).
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// A ring of `count` receive buffers of `len` bytes each, registered as buffer group `bgid`.
pub struct BufRing {
    /// Page-aligned array of `count` entries shared with the kernel.
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    /// `count * len` bytes of buffer memory.
    data: *mut u8,
    data_layout: Layout,
    count: u16,
    len: u32,
    /// Our copy of the tail; the kernel reads the shared one.
    tail: u16,
    pub bgid: u16,
    /// How many buffers the worker holds right now (for assertions and metrics).
    held: u32,
    /// Recycled buffers not published yet; the last recycled (the warmest) on top.
    spare: Vec<u16>,
    /// Buffers the kernel handed over since the last `top_up`.
    taken_since: u32,
    /// Decaying peak of `taken_since` over the recent `top_up`s.
    peak: u32,
    /// The last `top_up` left buffers on the spare stack.
    held_back: bool,
}

/// The fewest buffers kept published, however quiet the worker.
const MIN_DEPTH: u32 = 16;

impl BufRing {
    /// Allocates the entries and the buffers and publishes every buffer. `count` must be a power
    /// of two no larger than 32768. Register with `Ring::register_bufs` before use.
    pub fn new(count: u16, len: u32, bgid: u16) -> BufRing {
        assert!(
            count.is_power_of_two() && count <= 32768,
            "buffer count must be a power of two"
        );
        assert!(len > 0);
        let ring_layout =
            Layout::from_size_align(count as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .expect("buffer ring layout");
        let data_layout =
            Layout::from_size_align(count as usize * len as usize, 64).expect("buffer layout");
        // SAFETY: both layouts have a non-zero size (count >= 1, len >= 1).
        let ring = unsafe { alloc_zeroed(ring_layout) } as *mut BufRingEntry;
        // SAFETY: as above.
        let data = unsafe { alloc_zeroed(data_layout) };
        if ring.is_null() || data.is_null() {
            std::alloc::handle_alloc_error(ring_layout);
        }
        let mut b = BufRing {
            ring,
            ring_layout,
            data,
            data_layout,
            count,
            len,
            tail: 0,
            bgid,
            held: 0,
            spare: Vec::with_capacity(count as usize),
            taken_since: 0,
            peak: count as u32,
            held_back: false,
        };
        for bid in 0..count {
            b.add(bid);
        }
        b.publish();
        b
    }

    /// Address of the entry array, for registration.
    pub(crate) fn ring_addr(&self) -> u64 {
        self.ring as u64
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn buf_len(&self) -> u32 {
        self.len
    }

    /// Buffers the worker holds (received into, not yet recycled).
    pub fn held(&self) -> u32 {
        self.held
    }

    /// Writes the entry for `bid` at our tail without publishing it.
    fn add(&mut self, bid: u16) {
        let idx = (self.tail & (self.count - 1)) as usize;
        // SAFETY: idx < count, so the entry lies inside the allocation. The kernel only reads
        // entries between its head and the published tail; this one is past the published tail
        // (the kernel consumed it or it was never published), so writing it races with nothing.
        let entry = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < count, so the buffer lies inside the data allocation.
        entry.set_addr(unsafe { self.data.add(bid as usize * self.len as usize) } as u64);
        entry.set_len(self.len);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every added entry visible to the kernel.
    fn publish(&mut self) {
        // SAFETY: the tail field overlays the reserved field of entry 0 (the kernel ABI); the
        // pointer is the base of our live, aligned entry array. The release store orders the
        // entry writes in `add` before the kernel can see the new tail.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The `len` received bytes of buffer `bid`. Valid until `recycle(bid)`; see module docs.
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        assert!(
            bid < self.count && len <= self.len as usize,
            "buffer id or length out of range"
        );
        // SAFETY: in range (checked above). A completion handed buffer `bid` to the worker (see
        // module docs), so the kernel does not write it until `recycle`, which needs `&mut self`
        // and so cannot happen while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.data.add(bid as usize * self.len as usize), len) }
    }

    /// Marks buffer `bid` as handed to the worker by a completion.
    pub(crate) fn taken(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        self.held += 1;
        self.taken_since += 1;
        debug_assert!(self.held <= self.count as u32);
    }

    /// Takes buffer `bid` back from the worker. It is published again by a later `top_up`.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.count, "buffer id out of range");
        debug_assert!(self.held > 0 && !self.spare.contains(&bid));
        self.held -= 1;
        self.spare.push(bid);
    }

    /// Buffers published and not yet taken by the kernel.
    pub fn published(&self) -> u32 {
        self.count as u32 - self.held - self.spare.len() as u32
    }

    /// How many buffers should be published now (see the module docs).
    fn depth(&self) -> u32 {
        (2 * self.peak).max(MIN_DEPTH).min(self.count as u32)
    }

    /// Publishes spare buffers, warmest first, until `depth` are published. Call before each
    /// submission; it also ages the peak of buffers taken per turn.
    pub fn top_up(&mut self) {
        let taken = std::mem::take(&mut self.taken_since);
        // The peak halves in about 11 turns without receives.
        self.peak = taken.max(self.peak - self.peak.div_ceil(16));
        let want = self.depth();
        let mut published = self.published();
        if published < want && !self.spare.is_empty() {
            while published < want {
                let Some(bid) = self.spare.pop() else { break };
                self.add(bid);
                published += 1;
            }
            self.publish();
        }
        self.held_back = !self.spare.is_empty();
    }

    /// A receive found no published buffer (ENOBUFS). Returns whether the last `top_up` held
    /// buffers back (the next one publishes more); false means every buffer was in the worker's
    /// hands: the worker is overloaded.
    pub fn short(&self) -> bool {
        self.held_back
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; `Ring` closes the io_uring (which drops
        // the kernel's reference to the buffer ring) before dropping this.
        unsafe {
            dealloc(self.ring as *mut u8, self.ring_layout);
            dealloc(self.data, self.data_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffer_ring_publishes_every_buffer() {
        let b = BufRing::new(8, 64, 0);
        assert_eq!(b.held(), 0);
        // SAFETY-free check through the public view: the tail the kernel reads equals count.
        assert_eq!(b.tail, 8);
    }

    /// What the kernel does on a receive: take the buffer at its head. Returns its id.
    fn kernel_takes(b: &mut BufRing, head: &mut u16) -> u16 {
        assert!(
            b.published() > 0,
            "the kernel would fail this receive with ENOBUFS"
        );
        let idx = (*head & (b.count - 1)) as usize;
        // SAFETY: idx < count, inside the entry array; nothing else touches it in this test.
        let bid = unsafe { (*b.ring.add(idx)).bid() };
        *head = head.wrapping_add(1);
        b.taken(bid);
        bid
    }

    #[test]
    fn a_recycled_buffer_is_published_again_at_the_next_top_up() {
        let mut b = BufRing::new(4, 16, 0);
        let mut head = 0;
        let bid = kernel_takes(&mut b, &mut head);
        assert_eq!(b.held(), 1);
        b.recycle(bid);
        assert_eq!(b.held(), 0);
        assert_eq!(b.published(), 3, "recycled, not yet published");
        b.top_up();
        assert_eq!(b.published(), 4);
        assert_eq!(b.tail, 5);
        assert_eq!(b.get(bid, 16).len(), 16);
    }

    #[test]
    fn a_worker_taking_few_buffers_per_turn_cycles_through_a_small_warm_set() {
        let mut b = BufRing::new(128, 16, 0);
        let mut head = 0;
        let mut used = std::collections::HashSet::new();
        for turn in 0..400 {
            let got: Vec<u16> = (0..3).map(|_| kernel_takes(&mut b, &mut head)).collect();
            if turn >= 200 {
                used.extend(got.iter().copied());
            }
            for bid in got {
                b.recycle(bid);
            }
            b.top_up();
        }
        assert_eq!(
            b.published(),
            MIN_DEPTH,
            "3 a turn: the floor of 16 is published"
        );
        assert_eq!(b.held(), 0);
        // Every buffer the kernel took in the last 200 turns was one of the 16 most recent
        // (plus the 3 the worker had in hand), not one of all 128 in turn.
        assert!(
            used.len() <= MIN_DEPTH as usize + 3,
            "{} buffers in use",
            used.len()
        );
    }

    #[test]
    fn running_short_while_buffers_are_held_back_publishes_twice_as_many() {
        let mut b = BufRing::new(64, 16, 0);
        assert!(!b.short(), "every buffer published: a real shortage");
        let mut head = 0;
        for _ in 0..200 {
            let bid = kernel_takes(&mut b, &mut head);
            b.recycle(bid);
            b.top_up();
        }
        assert_eq!(b.published(), MIN_DEPTH);
        // A burst: more receives in one turn than buffers published.
        let burst: Vec<u16> = (0..MIN_DEPTH)
            .map(|_| kernel_takes(&mut b, &mut head))
            .collect();
        assert_eq!(b.published(), 0);
        assert!(b.short(), "buffers were held back: not an overload");
        for bid in burst {
            b.recycle(bid);
        }
        b.top_up();
        assert_eq!(b.published(), 2 * MIN_DEPTH);
        // Another turn that takes them all: twice as many again, then every buffer.
        let burst: Vec<u16> = (0..2 * MIN_DEPTH)
            .map(|_| kernel_takes(&mut b, &mut head))
            .collect();
        assert!(b.short());
        for bid in burst {
            b.recycle(bid);
        }
        b.top_up();
        assert_eq!(b.published(), 64);
        assert!(!b.short(), "nothing held back any more");
    }

    #[test]
    fn the_published_depth_follows_the_buffers_taken_per_turn() {
        let mut b = BufRing::new(128, 16, 0);
        let mut head = 0;
        let mut turn = |b: &mut BufRing, n: usize| {
            let got: Vec<u16> = (0..n).map(|_| kernel_takes(b, &mut head)).collect();
            for bid in got {
                b.recycle(bid);
            }
            b.top_up();
        };
        for _ in 0..300 {
            turn(&mut b, 20);
        }
        assert_eq!(b.published(), 40, "twice the 20 taken per turn");
        for _ in 0..300 {
            turn(&mut b, 1);
        }
        assert_eq!(b.published(), MIN_DEPTH);
        turn(&mut b, 16);
        assert_eq!(b.published(), 32, "a busier turn raises the depth at once");
    }
}
