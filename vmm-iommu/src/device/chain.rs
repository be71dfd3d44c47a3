//! Walking a request chain's descriptors.
//!
//! virtio-queue's `DescriptorChain` reads every descriptor through
//! vm-memory's `Bytes::read_obj`: a slice iterator, a `memcpy` call for
//! the 16 bytes and error values built and dropped on the way: a sixth of
//! a MAP+UNMAP pair's time at N = 0 (four descriptors a pair).
//! This walk follows the same rules (below) and reads a descriptor with
//! one bounds-checked 16-byte load: from the queue's descriptor table
//! taken once per pass as one slice of guest RAM where it lies in one
//! region, else through the memory's own slices.
//!
//! The rules are virtio-queue 0.18's, so that the device answers a chain
//! exactly as before; the test below walks random tables both ways:
//! - the walk ends at a descriptor without NEXT, after as many
//!   descriptors as the table has (a loop ends there: the `ttl`), at an
//!   index outside the table, or at a descriptor it cannot read;
//! - a descriptor with INDIRECT replaces the table by the one it points
//!   to (its `len` a multiple of 16, at most 65,535 entries), walked from
//!   entry 0; an INDIRECT inside an indirect table ends the walk;
//! - the walk ends before a descriptor that would take the bytes yielded
//!   past `u32::MAX`.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileMemory, VolatileSlice};

use virtio_queue::desc::split::Descriptor;

/// Size of a split-ring descriptor (virtio 1.3, 2.7.5).
const DESC_SIZE: u64 = 16;

/// `VIRTQ_DESC_F_NEXT`, `VIRTQ_DESC_F_INDIRECT`.
const F_NEXT: u16 = 1;
const F_INDIRECT: u16 = 4;

/// The descriptors of one chain, in order (see the module documentation).
pub(super) struct Descriptors<'a, M, S> {
    mem: &'a M,
    /// The queue's descriptor table as one slice, when it lies in one
    /// region of plain RAM; `None` once in an indirect table.
    direct: Option<&'a VolatileSlice<'a, S>>,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    yielded: u32,
    indirect: bool,
}

impl<'a, M: GuestMemory, S: BitmapSlice> Descriptors<'a, M, S> {
    /// The chain starting at `head` in the queue's table at `table` of
    /// `size` entries; `direct` is that table as one slice, if the caller
    /// has it.
    pub(super) fn new(
        mem: &'a M,
        direct: Option<&'a VolatileSlice<'a, S>>,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Self {
        Descriptors {
            mem,
            direct,
            table,
            size,
            next: head,
            ttl: size,
            yielded: 0,
            indirect: false,
        }
    }

    /// The descriptor at `index` of the current table.
    #[inline]
    fn read(&self, index: u16) -> Option<Descriptor> {
        let off = u64::from(index) * DESC_SIZE;
        if let Some(t) = self.direct {
            return t
                .get_ref::<Descriptor>(usize::try_from(off).ok()?)
                .ok()
                .map(|r| r.load());
        }
        read_through(self.mem, self.table.0.checked_add(off)?)
    }
}

/// A descriptor read through `mem`'s slices (a table that is not one slice
/// of plain RAM, or an indirect table).
fn read_through<M: GuestMemory>(mem: &M, at: u64) -> Option<Descriptor> {
    let mut slices = mem
        .get_slices(GuestAddress(at), DESC_SIZE as usize, Permissions::Read)
        .ok()?;
    let first = slices.next()?.ok()?;
    if first.len() == DESC_SIZE as usize {
        return first.get_ref::<Descriptor>(0).ok().map(|r| r.load());
    }
    // Split across regions: byte by byte, as `read_obj` does.
    let mut d = Descriptor::default();
    super::guest_bytes::read(
        mem,
        GuestAddress(at),
        vm_memory::ByteValued::as_mut_slice(&mut d),
    )
    .ok()?;
    Some(d)
}

impl<M: GuestMemory, S: BitmapSlice> Iterator for Descriptors<'_, M, S> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let desc = self.read(self.next)?;
            if desc.flags() & F_INDIRECT != 0 {
                // One level of indirection only; the table's length a
                // whole number of descriptors, at most a u16's worth.
                if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
                    return None;
                }
                let entries = u16::try_from(u64::from(desc.len()) / DESC_SIZE).ok()?;
                self.table = desc.addr();
                self.direct = None;
                self.size = entries;
                self.next = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            self.yielded = self.yielded.checked_add(desc.len())?;
            if desc.flags() & F_NEXT != 0 {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{
        ByteValued, Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
        MemoryRegionAddress,
    };

    use crate::testing::DriverQueue;

    const TABLE: u64 = 0x1000;
    const SIZE: u16 = 16;

    /// Two regions that touch, so that tables and descriptors can span
    /// them; the queue's table in the first.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x3000), (GuestAddress(0x3000), 0x2000)])
            .unwrap()
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random descriptor, biased towards what makes walks interesting:
    /// NEXT chains, indices near the table's end, indirect tables at
    /// awkward places and lengths, lengths near `u32::MAX`.
    fn random_desc(r: &mut Rng) -> Descriptor {
        let flags = match r.below(8) {
            0 => F_INDIRECT,
            1 => F_INDIRECT | F_NEXT,
            2 => 0,
            3 => 2,
            _ => F_NEXT | (r.below(2) as u16 * 2),
        };
        let (addr, len) = if flags & F_INDIRECT != 0 {
            let addr = match r.below(4) {
                // In the first region, in the second, across both, outside.
                0 => 0x2000 + r.below(0x40) * 8,
                1 => 0x3800 + r.below(0x40) * 16,
                2 => 0x3000 - 8 * (1 + r.below(3)),
                _ => 0x10_0000,
            };
            let len = match r.below(5) {
                0 => 16 * r.below(8) as u32 + 8,
                1 => 0,
                2 => 0x10_0000,
                _ => 16 * (1 + r.below(12) as u32),
            };
            (addr, len)
        } else {
            let len = match r.below(4) {
                0 => u32::MAX - r.below(3) as u32,
                1 => 0,
                _ => r.below(0x1000) as u32,
            };
            (r.next(), len)
        };
        let next = match r.below(4) {
            0 => SIZE + r.below(4) as u16,
            _ => r.below(u64::from(SIZE)) as u16,
        };
        Descriptor::new(addr, len, flags, next)
    }

    fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    #[test]
    fn walks_random_tables_as_virtio_queue_does() {
        let mem = mem();
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let region = mem.find_region(GuestAddress(TABLE)).unwrap();
        let table = region
            .get_slice(MemoryRegionAddress(TABLE), usize::from(SIZE) * 16)
            .unwrap();
        // The queue's rings right after its table (below 0x2000).
        let driver = DriverQueue::new(&mem, GuestAddress(TABLE), SIZE);
        let (mut walked, mut indirect) = (0usize, 0usize);
        for _ in 0..3000 {
            // The queue's table, and every place an indirect table may
            // point to, filled at random (eight bytes at a time, so that
            // indirect tables at any 8-byte offset hold descriptors too).
            for i in 0..u64::from(SIZE) {
                mem.write_obj(random_desc(&mut r), GuestAddress(TABLE + 16 * i))
                    .unwrap();
            }
            for at in (0x2000..0x5000).step_by(8) {
                let d = random_desc(&mut r);
                let half = if r.below(2) == 0 { 0 } else { 8 };
                mem.write_slice(&d.as_slice()[half..half + 8], GuestAddress(at))
                    .unwrap();
            }
            let head = r.below(u64::from(SIZE) + 2) as u16;
            let theirs: Vec<_> = virtio_queue_chain(&mem, &driver, head)
                .iter()
                .map(fields)
                .collect();
            for direct in [Some(&table), None] {
                let ours: Vec<_> = Descriptors::new(&mem, direct, GuestAddress(TABLE), SIZE, head)
                    .map(|d| fields(&d))
                    .collect();
                assert_eq!(ours, theirs, "head {head}, direct {}", direct.is_some());
            }
            walked += theirs.len();
            indirect += usize::from(
                mem.read_obj::<Descriptor>(GuestAddress(TABLE + 16 * u64::from(head)))
                    .is_ok_and(|d| d.flags() & F_INDIRECT != 0 && !theirs.is_empty()),
            );
        }
        // The random tables made real walks, indirect ones among them.
        assert!(walked > 3000, "{walked} descriptors walked");
        assert!(indirect > 100, "{indirect} walks through an indirect table");
    }

    /// Each rule of the walk on a chain made for it: the walk's length,
    /// and the same descriptors as virtio-queue's walk.
    #[test]
    fn each_rule_ends_the_walk_where_virtio_queue_does() {
        let mem = mem();
        let driver = DriverQueue::new(&mem, GuestAddress(TABLE), SIZE);
        let region = mem.find_region(GuestAddress(TABLE)).unwrap();
        let table = region
            .get_slice(MemoryRegionAddress(TABLE), usize::from(SIZE) * 16)
            .unwrap();
        let put = |at: u64, d: Descriptor| mem.write_obj(d, GuestAddress(at)).unwrap();
        let queue = |i: u16| TABLE + 16 * u64::from(i);
        let ind = |i: u64| 0x2000 + 16 * i;
        let d = Descriptor::new;
        type Setup<'a> = (&'a str, &'a dyn Fn(), usize);
        let cases: [Setup; 10] = [
            (
                "a chain of three",
                &|| {
                    put(queue(0), d(0x10, 8, F_NEXT, 5));
                    put(queue(5), d(0x20, 8, F_NEXT | 2, 9));
                    put(queue(9), d(0x30, 4, 2, 0));
                },
                3,
            ),
            (
                "a loop ends after a table's worth",
                &|| {
                    put(queue(0), d(0x10, 8, F_NEXT, 1));
                    put(queue(1), d(0x20, 8, F_NEXT, 0));
                },
                usize::from(SIZE),
            ),
            (
                "next outside the table",
                &|| {
                    put(queue(0), d(0x10, 8, F_NEXT, SIZE));
                },
                1,
            ),
            (
                "bytes past u32::MAX",
                &|| {
                    put(queue(0), d(0x10, u32::MAX, F_NEXT, 1));
                    put(queue(1), d(0x20, 1, 0, 0));
                },
                1,
            ),
            (
                "an indirect table",
                &|| {
                    put(queue(0), d(0x2000, 48, F_INDIRECT, 0));
                    put(ind(0), d(0x10, 8, F_NEXT, 1));
                    put(ind(1), d(0x20, 8, F_NEXT, 2));
                    put(ind(2), d(0x30, 4, 2, 0));
                },
                3,
            ),
            (
                "an indirect table within an indirect table",
                &|| {
                    put(queue(0), d(0x2000, 48, F_INDIRECT, 0));
                    put(ind(0), d(0x10, 8, F_NEXT, 1));
                    put(ind(1), d(0x2100, 16, F_INDIRECT, 0));
                    put(0x2100, d(0x40, 4, 2, 0));
                },
                1,
            ),
            (
                "an indirect length not a multiple of 16",
                &|| {
                    put(queue(0), d(0x2000, 40, F_INDIRECT, 0));
                },
                0,
            ),
            (
                "an indirect table of more than 65,535 entries",
                &|| {
                    put(queue(0), d(0x2000, 16 * 65_536, F_INDIRECT, 0));
                },
                0,
            ),
            (
                "an indirect table across two regions",
                &|| {
                    put(queue(0), d(0x3000 - 24, 48, F_INDIRECT, 0));
                    // The second descriptor straddles the regions' boundary.
                    put(0x3000 - 24, d(0x10, 8, F_NEXT, 1));
                    put(0x3000 - 8, d(0x20, 8, F_NEXT, 2));
                    put(0x3000 + 8, d(0x30, 4, 2, 0));
                },
                3,
            ),
            (
                "an indirect table outside guest memory",
                &|| {
                    put(queue(0), d(0x10_0000, 32, F_INDIRECT, 0));
                },
                0,
            ),
        ];
        for (what, setup, len) in cases {
            for i in 0..SIZE {
                put(queue(i), Descriptor::default());
            }
            setup();
            let theirs = virtio_queue_chain(&mem, &driver, 0);
            assert_eq!(theirs.len(), len, "{what}: virtio-queue");
            for direct in [Some(&table), None] {
                let ours: Vec<_> = Descriptors::new(&mem, direct, GuestAddress(TABLE), SIZE, 0)
                    .map(|d| fields(&d))
                    .collect();
                let theirs: Vec<_> = theirs.iter().map(fields).collect();
                assert_eq!(ours, theirs, "{what}, direct {}", direct.is_some());
            }
        }
    }

    /// virtio-queue's walk of the chain at `head` of the queue's table.
    fn virtio_queue_chain(
        mem: &GuestMemoryMmap,
        driver: &DriverQueue,
        head: u16,
    ) -> Vec<Descriptor> {
        let avail = TABLE + 16 * u64::from(SIZE);
        mem.write_obj(head, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let mut q = driver.device_queue();
        let chain = q.iter(mem).unwrap().next().unwrap();
        chain.collect()
    }
}
