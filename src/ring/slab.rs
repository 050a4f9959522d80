//! A slab with generations, grown in fixed chunks: the ring's in-flight table and the worker's
//! connection and commit tables.
//!
//! Chunks, not one growing `Vec`: growing a `Vec` copies every live entry into a block twice the
//! size and the allocator may keep the old block resident, which at 10,000 idle connections was
//! most of their memory. A chunk, once allocated, never moves, and only chunks that are in use
//! are touched.

/// Entries per chunk.
const CHUNK: usize = 256;

pub struct Slab<T> {
    chunks: Vec<Box<[Option<T>]>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    len: usize,
    /// Generations wrap inside this mask (so they fit in a `Token`).
    gen_mask: u32,
}

impl<T> Slab<T> {
    pub fn new(gen_mask: u32) -> Slab<T> {
        Slab {
            chunks: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            len: 0,
            gen_mask,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots ever created (an upper bound for slot numbers).
    pub fn slots(&self) -> usize {
        self.generations.len()
    }

    /// A free slot and its current generation; fill it with `fill`.
    pub fn vacant(&mut self) -> (u32, u32) {
        if let Some(s) = self.free.pop() {
            return (s, self.generations[s as usize]);
        }
        let slot = self.generations.len();
        if slot == self.chunks.len() * CHUNK {
            self.chunks.push((0..CHUNK).map(|_| None).collect());
        }
        self.generations.push(0);
        // A slot that was handed out but not filled goes back on the free list if unused; the
        // callers always fill it right away.
        (slot as u32, 0)
    }

    fn cell(&mut self, slot: u32) -> Option<&mut Option<T>> {
        let s = slot as usize;
        self.chunks.get_mut(s / CHUNK).map(|c| &mut c[s % CHUNK])
    }

    /// Stores `item` in a slot returned by `vacant`.
    pub fn fill(&mut self, slot: u32, item: T) {
        let cell = self.cell(slot).expect("slot from vacant()");
        debug_assert!(cell.is_none());
        *cell = Some(item);
        self.len += 1;
    }

    /// The current generation of `slot`.
    pub fn generation(&self, slot: u32) -> Option<u32> {
        self.generations.get(slot as usize).copied()
    }

    /// The item in `slot` if it is still of `generation`.
    pub fn get_mut(&mut self, slot: u32, generation: u32) -> Option<&mut T> {
        if self.generation(slot) != Some(generation) {
            return None;
        }
        self.cell(slot)?.as_mut()
    }

    /// The item in `slot`, whatever its generation.
    pub fn get(&self, slot: u32) -> Option<&T> {
        let s = slot as usize;
        self.chunks.get(s / CHUNK)?[s % CHUNK].as_ref()
    }

    /// The item in `slot`, whatever its generation.
    pub fn get_any_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.cell(slot)?.as_mut()
    }

    /// Takes the item out of `slot` and retires the slot's generation.
    pub fn remove(&mut self, slot: u32) -> Option<T> {
        let item = self.cell(slot)?.take()?;
        let g = &mut self.generations[slot as usize];
        *g = g.wrapping_add(1) & self.gen_mask;
        self.free.push(slot);
        self.len -= 1;
        Some(item)
    }

    /// Every item with its slot and generation.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, u32, &mut T)> + '_ {
        let generations = &self.generations;
        self.chunks
            .iter_mut()
            .enumerate()
            .flat_map(move |(ci, chunk)| {
                chunk.iter_mut().enumerate().filter_map(move |(i, cell)| {
                    let slot = ci * CHUNK + i;
                    cell.as_mut()
                        .map(|item| (slot as u32, generations[slot], item))
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_with_a_new_generation() {
        let mut s: Slab<&str> = Slab::new(0xFF);
        let (a, ga) = s.vacant();
        s.fill(a, "a");
        let (b, gb) = s.vacant();
        s.fill(b, "b");
        assert_ne!(a, b);
        assert_eq!(s.remove(a), Some("a"));
        assert!(s.get_mut(a, ga).is_none());
        let (c, gc) = s.vacant();
        assert_eq!(c, a);
        assert_ne!(gc, ga);
        s.fill(c, "c");
        // A stale (slot, generation) pair never reaches the new item.
        assert!(s.get_mut(a, ga).is_none());
        assert_eq!(s.get_mut(c, gc).copied(), Some("c"));
        assert_eq!(s.get_mut(b, gb).copied(), Some("b"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn grows_in_chunks_without_moving_items_and_iterates_all() {
        let mut s: Slab<usize> = Slab::new(u32::MAX);
        for i in 0..1000 {
            let (slot, _) = s.vacant();
            s.fill(slot, i);
        }
        let first = s.get(0).unwrap() as *const usize;
        for i in 0..1000 {
            let (slot, _) = s.vacant();
            s.fill(slot, 1000 + i);
        }
        assert_eq!(
            first,
            s.get(0).unwrap() as *const usize,
            "an item moved when the slab grew"
        );
        assert_eq!(s.iter_mut().count(), 2000);
        assert_eq!(
            s.iter_mut().map(|(_, _, v)| *v).sum::<usize>(),
            (0..2000).sum()
        );
        for slot in (0..2000).step_by(2) {
            s.remove(slot);
        }
        assert_eq!(s.iter_mut().count(), 1000);
    }

    #[test]
    fn generations_wrap_inside_their_mask() {
        let mut s: Slab<u8> = Slab::new(0x3);
        let (slot, _) = s.vacant();
        for _ in 0..5 {
            s.fill(slot, 1);
            s.remove(slot);
        }
        assert!(s.generation(slot).unwrap() <= 0x3);
    }
}
