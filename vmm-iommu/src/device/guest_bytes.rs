//! The request queue's small copies between guest memory and the device:
//! a request read in, a status written out.
//!
//! vm-memory's `Bytes` methods take every access through the slice
//! iterator's `stop_on_error`, whose default wraps the iterator in a
//! `Peekable` of large `Result`s copied at every step; for a request of a
//! few dozen bytes that was a tenth of its handling. These walk the same
//! slices (`GuestMemory::get_slices`, so memory behind a translation works
//! alike) with the same all-or-nothing result, and no wrapper.

use vm_memory::{ByteValued, GuestAddress, GuestMemory, Permissions, VolatileMemory};

/// Reads all of `buf` from guest memory at `addr`.
pub(super) fn read<M: GuestMemory>(mem: &M, addr: GuestAddress, buf: &mut [u8]) -> Result<(), ()> {
    let mut done = 0;
    for s in mem
        .get_slices(addr, buf.len(), Permissions::Read)
        .map_err(|_| ())?
    {
        let s = s.map_err(|_| ())?;
        let dst = buf.get_mut(done..done + s.len()).ok_or(())?;
        s.copy_to(dst);
        done += s.len();
    }
    (done == buf.len()).then_some(()).ok_or(())
}

/// Writes all of `data` to guest memory at `addr`.
pub(super) fn write<M: GuestMemory>(mem: &M, addr: GuestAddress, data: &[u8]) -> Result<(), ()> {
    let mut done = 0;
    for s in mem
        .get_slices(addr, data.len(), Permissions::Write)
        .map_err(|_| ())?
    {
        let s = s.map_err(|_| ())?;
        let src = data.get(done..done + s.len()).ok_or(())?;
        s.copy_from(src);
        done += s.len();
    }
    (done == data.len()).then_some(()).ok_or(())
}

/// Writes `value` (already in guest byte order) at `addr`: one store
/// where it lies in one slice (a request's tail, a used element: nearly
/// always), else byte by byte as [`write()`] does.
///
/// Apart from [`write()`] because a value built as bytes on the stack and
/// copied from there is a load over smaller stores, which the core cannot
/// forward (a stall on every request's tail), and because `Bytes::write_obj`
/// builds and drops error values on the way.
pub(super) fn store<M: GuestMemory, T: ByteValued>(
    mem: &M,
    addr: GuestAddress,
    value: T,
) -> Result<(), ()> {
    let size = std::mem::size_of::<T>();
    let mut slices = mem
        .get_slices(addr, size, Permissions::Write)
        .map_err(|_| ())?;
    let first = slices.next().ok_or(())?.map_err(|_| ())?;
    if first.len() == size {
        first.get_ref::<T>(0).map_err(|_| ())?.store(value);
        return Ok(());
    }
    write(mem, addr, value.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn ram() -> GuestMemoryMmap {
        // Two regions that touch: a copy may span them.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn copies_within_and_across_regions_as_bytes_does() {
        let mem = ram();
        let data: Vec<u8> = (1..=40).collect();
        write(&mem, GuestAddress(0xff0), &data).unwrap();
        let mut back = [0u8; 40];
        mem.read_slice(&mut back, GuestAddress(0xff0)).unwrap();
        assert_eq!(&back[..], &data[..]);
        let mut again = [0u8; 40];
        read(&mem, GuestAddress(0xff0), &mut again).unwrap();
        assert_eq!(again, back);
        let mut small = [0u8; 4];
        read(&mem, GuestAddress(0x10), &mut small).unwrap();
        assert_eq!(small, [0; 4]);
    }

    #[test]
    fn reads_every_length_at_every_offset_near_a_boundary_as_bytes_does() {
        let mem = ram();
        let data: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&data, GuestAddress(0)).unwrap();
        for at in 0xfe0..0x1000u64 {
            for len in 0..70 {
                let mut ours = vec![0u8; len];
                read(&mem, GuestAddress(at), &mut ours).unwrap();
                assert_eq!(
                    &ours[..],
                    &data[at as usize..at as usize + len],
                    "{at:#x}+{len}"
                );
            }
        }
    }

    #[test]
    fn a_word_lands_as_its_bytes_would_within_and_across_regions() {
        let mem = ram();
        for at in [0x10u64, 0x13, 0xffc, 0xffd, 0xfff, 0x1ffc] {
            store(&mem, GuestAddress(at), 0x0403_0201u32.to_le()).unwrap();
            let mut back = [0u8; 4];
            mem.read_slice(&mut back, GuestAddress(at)).unwrap();
            assert_eq!(back, [1, 2, 3, 4], "at {at:#x}");
        }
        // Past the end, or wrapping: an error.
        assert!(store(&mem, GuestAddress(0x1ffd), 1u32).is_err());
        assert!(store(&mem, GuestAddress(u64::MAX - 1), 1u32).is_err());
        assert!(store(&mem, GuestAddress(0x5000), 1u64).is_err());
        // Eight bytes across the regions' boundary.
        store(&mem, GuestAddress(0xffa), 0x0807_0605_0403_0201u64.to_le()).unwrap();
        let mut back = [0u8; 8];
        mem.read_slice(&mut back, GuestAddress(0xffa)).unwrap();
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn a_copy_that_leaves_guest_memory_is_an_error() {
        let mem = ram();
        let mut buf = [0u8; 16];
        // Runs past the end: an error, as from `read_slice` and
        // `write_slice` (which also copy the part inside first).
        assert!(read(&mem, GuestAddress(0x1ff8), &mut buf).is_err());
        assert!(write(&mem, GuestAddress(0x1ff8), &[7u8; 16]).is_err());
        // Starts outside, or at an address that wraps.
        assert!(read(&mem, GuestAddress(0x4000), &mut buf).is_err());
        assert!(write(&mem, GuestAddress(u64::MAX - 3), &[7u8; 16]).is_err());
        // An empty copy anywhere in memory is done.
        assert!(read(&mem, GuestAddress(0x10), &mut []).is_ok());
    }
}
