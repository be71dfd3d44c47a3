//! Loads the guest program: a static x86-64 ELF executable whose `PT_LOAD`
//! segments must all lie in the program area the layout reserves
//! (`abi::GUEST_LOAD_ADDR..abi::GUEST_LOAD_END`). Every header field is
//! checked before use, so a corrupt file is an error, never a panic or a
//! write outside that area.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::abi;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
/// Most program headers read: a static executable has a handful.
const MAX_PHDRS: u16 = 64;

/// Why the guest program cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Not a little-endian 64-bit x86-64 executable.
    #[error("not a static x86-64 ELF64 executable: {0}")]
    Format(&'static str),
    /// A header points outside the file.
    #[error("{0} lies outside the file")]
    Truncated(&'static str),
    /// A segment lies outside the program area.
    #[error(
        "segment at {addr:#x} of {size:#x} bytes is outside the program area {lo:#x}..{hi:#x}"
    )]
    Placement {
        /// Its guest-physical address.
        addr: u64,
        /// Its size in memory.
        size: u64,
        /// Start of the area.
        lo: u64,
        /// End of the area.
        hi: u64,
    },
    /// The entry point is in no loaded segment.
    #[error("entry point {0:#x} is in no loaded segment")]
    Entry(u64),
    /// Writing guest memory failed.
    #[error("cannot write the program into guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// One `PT_LOAD` segment, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: usize,
    file_size: usize,
    addr: u64,
    mem_size: u64,
}

/// Parses the headers of `elf`: the entry point and the load segments.
fn parse(elf: &[u8]) -> Result<(u64, Vec<Segment>), ElfError> {
    let short = || ElfError::Truncated("the ELF header");
    if elf.len() < EHDR_SIZE || elf[..4] != *b"\x7fELF" {
        return Err(ElfError::Format("bad magic"));
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(ElfError::Format("not ELF64 little-endian"));
    }
    if u16_at(elf, 16).ok_or_else(short)? != ET_EXEC {
        return Err(ElfError::Format("not an executable (ET_EXEC)"));
    }
    if u16_at(elf, 18).ok_or_else(short)? != EM_X86_64 {
        return Err(ElfError::Format("not x86-64"));
    }
    let entry = u64_at(elf, 24).ok_or_else(short)?;
    let phoff = u64_at(elf, 32).ok_or_else(short)?;
    let phentsize = u16_at(elf, 54).ok_or_else(short)?;
    let phnum = u16_at(elf, 56).ok_or_else(short)?;
    if usize::from(phentsize) != PHDR_SIZE || phnum > MAX_PHDRS {
        return Err(ElfError::Format("unexpected program header size or count"));
    }
    let (lo, hi) = (abi::GUEST_LOAD_ADDR, abi::GUEST_LOAD_END);
    let mut segments = Vec::new();
    for i in 0..usize::from(phnum) {
        let ph = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * PHDR_SIZE))
            .and_then(|o| elf.get(o..o.checked_add(PHDR_SIZE)?))
            .ok_or(ElfError::Truncated("a program header"))?;
        let bad = || ElfError::Truncated("a program header");
        if u32_at(ph, 0).ok_or_else(bad)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(ph, 8).ok_or_else(bad)?;
        let addr = u64_at(ph, 24).ok_or_else(bad)?; // p_paddr: identity-mapped
        let file_size = u64_at(ph, 32).ok_or_else(bad)?;
        let mem_size = u64_at(ph, 40).ok_or_else(bad)?;
        let in_file = offset
            .checked_add(file_size)
            .is_some_and(|end| end <= elf.len() as u64);
        if file_size > mem_size || !in_file {
            return Err(ElfError::Truncated("a segment's bytes"));
        }
        let fits = addr >= lo && addr.checked_add(mem_size).is_some_and(|end| end <= hi);
        if !fits {
            return Err(ElfError::Placement {
                addr,
                size: mem_size,
                lo,
                hi,
            });
        }
        // Both bounded by the file length above.
        segments.push(Segment {
            offset: offset as usize,
            file_size: file_size as usize,
            addr,
            mem_size,
        });
    }
    if !segments
        .iter()
        .any(|s| entry >= s.addr && entry - s.addr < s.mem_size)
    {
        return Err(ElfError::Entry(entry));
    }
    Ok((entry, segments))
}

/// Writes the program's segments into `mem` (zeroing what the file does
/// not hold) and returns its entry point.
pub fn load(mem: &GuestMemoryMmap, elf: &[u8]) -> Result<u64, ElfError> {
    let (entry, segments) = parse(elf)?;
    // The whole area starts zeroed, which covers every segment's .bss.
    let area = (abi::GUEST_LOAD_END - abi::GUEST_LOAD_ADDR) as usize;
    mem.write_slice(&vec![0u8; area], GuestAddress(abi::GUEST_LOAD_ADDR))?;
    for s in segments {
        mem.write_slice(&elf[s.offset..s.offset + s.file_size], GuestAddress(s.addr))?;
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal executable with one segment of `code` at `addr`.
    fn elf(addr: u64, code: &[u8], entry: u64) -> Vec<u8> {
        let mut f = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        let off = f.len() as u64;
        f[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 16).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn loads_a_segment_and_zeroes_its_bss() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_slice(&[0xffu8; 32], GuestAddress(abi::GUEST_LOAD_ADDR))
            .unwrap();
        let entry = load(
            &mem,
            &elf(abi::GUEST_LOAD_ADDR, &[0x90, 0xc3], abi::GUEST_LOAD_ADDR),
        )
        .unwrap();
        assert_eq!(entry, abi::GUEST_LOAD_ADDR);
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(abi::GUEST_LOAD_ADDR))
            .unwrap();
        assert_eq!(b, [0x90, 0xc3, 0, 0]);
    }

    #[test]
    fn segment_outside_the_program_area_is_refused() {
        let e = parse(&elf(0x1000, &[0x90], 0x1000)).unwrap_err();
        assert!(matches!(e, ElfError::Placement { addr: 0x1000, .. }), "{e}");
        let e = parse(&elf(
            abi::GUEST_LOAD_END - 4,
            &[0; 8],
            abi::GUEST_LOAD_END - 4,
        ))
        .unwrap_err();
        assert!(matches!(e, ElfError::Placement { .. }), "{e}");
    }

    #[test]
    fn entry_outside_every_segment_is_refused() {
        let e = parse(&elf(abi::GUEST_LOAD_ADDR, &[0x90], 0x1234)).unwrap_err();
        assert!(matches!(e, ElfError::Entry(0x1234)));
    }

    #[test]
    fn truncated_or_foreign_files_are_refused() {
        let good = elf(abi::GUEST_LOAD_ADDR, &[0x90; 8], abi::GUEST_LOAD_ADDR);
        for cut in [0, 10, EHDR_SIZE, EHDR_SIZE + 20, good.len() - 1] {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut arm = good.clone();
        arm[18] = 183;
        assert!(matches!(parse(&arm), Err(ElfError::Format(_))));
    }

    #[test]
    fn the_built_guest_program_parses() {
        let (entry, segs) = parse(crate::GUEST_ELF).unwrap();
        assert_eq!(entry, abi::GUEST_LOAD_ADDR);
        assert!(!segs.is_empty());
    }
}
