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
//!   `len` bytes the completion reported, until it calls `recycle(bid)`, which publishes it
//!   again. The worker never writes into a provided buffer. The memory (`ring` entries and
//!   `data`) is allocated once, never moves, and is freed only after the buffer ring has been
//!   unregistered or the io_uring instance closed (`Ring` drops its `IoUring` first).
//! - **Op buffers** (send data, write data, paths, iovecs, the eventfd counter): they live inside
//!   the `Op` value, which `Ring::push` moves into the ring's in-flight table. The kernel may read
//!   or write them from the push until the op's final completion (for multishot ops: the
//!   completion without IORING_CQE_F_MORE); only then is the `Op` handed back. Heap buffers
//!   (`Vec`, `Box`, `CString`) do not move when the table grows, so their addresses stay valid.
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
}

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
            held: count as u32,
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
        self.held -= 1;
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
        debug_assert!(self.held <= self.count as u32);
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.count, "buffer id out of range");
        self.add(bid);
        self.publish();
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

    #[test]
    fn recycle_republishes_a_taken_buffer() {
        let mut b = BufRing::new(4, 16, 0);
        b.taken(2);
        assert_eq!(b.held(), 1);
        b.recycle(2);
        assert_eq!(b.held(), 0);
        assert_eq!(b.tail, 5);
        assert_eq!(b.get(2, 16).len(), 16);
    }
}
