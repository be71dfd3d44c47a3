//! The guest's runtime: port I/O, MMIO, serial output, the done port, the
//! time-stamp counter, a page allocator, the memory functions the compiler
//! calls, and the panic handler.
//!
//! The guest runs at CPL3 on identity-mapped memory: port I/O to the VMM's
//! ports is allowed by the TSS's I/O permission bitmap, and a
//! guest-physical address is also a valid pointer.

use core::arch::asm;
use core::fmt;

use crate::abi;

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: the I/O permission bitmap allows the VMM's ports at CPL3;
    // the VMM emulates every port and no port touches memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes 32 bits to an I/O port.
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads 32 bits from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Marks sync point `n` (`abi::SYNC_PORT`): the VMM may pause, snapshot
/// and restore the VM, or plug devices, before the write returns.
pub fn sync(n: u32) {
    use core::sync::atomic::{compiler_fence, Ordering};
    // Memory written before the sync point is written before the VMM
    // acts on it; nothing read after it is read before.
    compiler_fence(Ordering::SeqCst);
    outl(abi::SYNC_PORT, n);
    compiler_fence(Ordering::SeqCst);
}

/// Reads 32 bits of MMIO. A full compiler barrier: DMA and device writes
/// happen behind the compiler's back during the access.
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    let v: u32;
    // SAFETY: `addr` is in the MMIO gap, identity-mapped with the U bit;
    // the access exits to the VMM and touches no guest RAM of ours.
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags))
    };
    v
}

/// Writes 32 bits of MMIO (a full compiler barrier, as `mmio_read32`).
#[inline(always)]
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as in `mmio_read32`.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags))
    }
}

/// Reads 8 bits of MMIO.
#[inline(always)]
pub fn mmio_read8(addr: u64) -> u8 {
    let v: u8;
    // SAFETY: as in `mmio_read32`.
    unsafe {
        asm!("mov {v}, byte ptr [{a}]", a = in(reg) addr, v = out(reg_byte) v, options(nostack, preserves_flags))
    };
    v
}

/// Writes 8 bits of MMIO.
#[inline(always)]
pub fn mmio_write8(addr: u64, v: u8) {
    // SAFETY: as in `mmio_read32`.
    unsafe {
        asm!("mov byte ptr [{a}], {v}", a = in(reg) addr, v = in(reg_byte) v, options(nostack, preserves_flags))
    }
}

/// Writes 64 bits of MMIO in one access.
#[inline(always)]
pub fn mmio_write64(addr: u64, v: u64) {
    // SAFETY: as in `mmio_read32`.
    unsafe {
        asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags))
    }
}

/// The time-stamp counter, ordered after earlier loads.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: CR4.TSD is clear, so RDTSC is allowed at CPL3.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Ends the guest with `code` (`abi::RESULT_PASS` when all checks held).
pub fn exit(code: u32) -> ! {
    outl(abi::DONE_PORT, code);
    // The VMM stops at the write above; never return to a caller that
    // believes the guest ended.
    loop {
        core::hint::spin_loop();
    }
}

/// The serial port, as a `fmt::Write`.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // One OUT (one exit) per byte: KVM here splits string I/O (`rep
        // outsb`) into one exit per byte anyway.
        for b in s.bytes() {
            outb(abi::SERIAL_PORT, b);
        }
        Ok(())
    }
}

/// Fault-record flags printed by name (`READ|WRITE|EXEC|PRIV|ADDRESS|PASID`), any
/// other bits in hex after them.
pub struct FlagNames(pub u32);

impl fmt::Display for FlagNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u32, &str); 6] = [
            (1, "READ"),
            (2, "WRITE"),
            (4, "EXEC"),
            (8, "PRIV"),
            (0x100, "ADDRESS"),
            (0x200, "PASID"),
        ];
        let mut rest = self.0;
        let mut first = true;
        for (bit, name) in NAMES {
            if rest & bit != 0 {
                f.write_str(if first { "" } else { "|" })?;
                f.write_str(name)?;
                rest &= !bit;
                first = false;
            }
        }
        if rest != 0 || first {
            write!(f, "{}{rest:#x}", if first { "" } else { "|" })?;
        }
        Ok(())
    }
}

/// Prints to the serial port.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::rt::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to the serial port.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}

/// Checks a condition; on failure prints where and why and ends the guest
/// with the line number as its result code.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::println!("FAIL {}:{}: {}", file!(), line!(), format_args!($($arg)*));
            $crate::rt::exit(line!());
        }
    };
}

/// Checks that two values are equal (printed in hex on failure).
#[macro_export]
macro_rules! check_eq {
    ($got:expr, $want:expr, $($arg:tt)*) => {{
        let (got, want) = ($got, $want);
        if got != want {
            $crate::println!(
                "FAIL {}:{}: {}: got {:#x}, want {:#x}",
                file!(), line!(), format_args!($($arg)*), got, want
            );
            $crate::rt::exit(line!());
        }
    }};
}

/// A bump allocator over one range of guest-physical memory.
pub struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    /// An allocator over `[start, end)`.
    pub const fn new(start: u64, end: u64) -> Self {
        Bump { next: start, end }
    }

    /// `size` zeroed bytes aligned to `align` (a power of two); ends the
    /// guest if the range is exhausted.
    pub fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let at = (self.next + align - 1) & !(align - 1);
        check!(
            at <= self.end && self.end - at >= size,
            "out of guest memory: {size:#x} bytes at {at:#x}, end {:#x}",
            self.end
        );
        self.next = at + size;
        zero(at, size);
        at
    }

    /// `n` zeroed 4 KiB pages.
    pub fn pages(&mut self, n: u64) -> u64 {
        self.alloc(n * 4096, 4096)
    }

    /// The first byte not yet handed out.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The end of the range.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// Zeroes `len` bytes at guest-physical `addr`.
pub fn zero(addr: u64, len: u64) {
    // SAFETY: callers pass memory they allocated from guest RAM.
    unsafe { memset(addr as *mut u8, 0, len as usize) };
}

/// Reads a byte of guest memory the VMM may have written (by DMA).
#[inline(always)]
pub fn peek8(addr: u64) -> u8 {
    // SAFETY: callers pass guest RAM; volatile because the VMM writes it
    // behind the compiler's back.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Writes a byte of guest memory.
#[inline(always)]
pub fn poke8(addr: u64, v: u8) {
    // SAFETY: as in `peek8`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

/// Reads a little-endian u16 of guest memory.
#[inline(always)]
pub fn peek16(addr: u64) -> u16 {
    // SAFETY: as in `peek8`; x86 allows unaligned access.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Writes a u16 of guest memory.
#[inline(always)]
pub fn poke16(addr: u64, v: u16) {
    // SAFETY: as in `peek8`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}

/// Reads a u32 of guest memory.
#[inline(always)]
pub fn peek32(addr: u64) -> u32 {
    // SAFETY: as in `peek8`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a u32 of guest memory.
#[inline(always)]
pub fn poke32(addr: u64, v: u32) {
    // SAFETY: as in `peek8`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Reads a u64 of guest memory.
#[inline(always)]
pub fn peek64(addr: u64) -> u64 {
    // SAFETY: as in `peek8`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes a u64 of guest memory.
#[inline(always)]
pub fn poke64(addr: u64, v: u64) {
    // SAFETY: as in `peek8`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Copies `src` into guest memory at `addr`.
pub fn write_bytes(addr: u64, src: &[u8]) {
    // SAFETY: callers pass guest RAM of at least `src.len()` bytes that
    // does not overlap `src`.
    unsafe { memcpy(addr as *mut u8, src.as_ptr(), src.len()) };
}

// The memory functions the compiler emits calls to. No libc here, so they
// are ours; string instructions keep LLVM from recognising a loop as a
// call to the very function it is in.

/// `memcpy`.
///
/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear per the ABI.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dst
}

/// `memmove`.
///
/// # Safety
/// `dst` and `src` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy never overwrites a source byte before
        // reading it when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    if n == 0 {
        return dst;
    }
    // SAFETY: copies backwards from the last byte, so an overlapping
    // destination above the source reads every byte before it is
    // overwritten; DF is restored before returning.
    unsafe {
        asm!(
            "std", "rep movsb", "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        )
    };
    dst
}

/// `memset`.
///
/// # Safety
/// `dst` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear per the ABI.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dst
}

/// `memcmp`.
///
/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n; volatile so the loop is not turned back into a
        // call to memcmp.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`: LLVM emits it for equality-only comparisons.
///
/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// core's unwinding tables name a personality routine even though
/// `panic=abort` never unwinds; the linker needs the symbol, nothing calls
/// it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    exit(abi::RESULT_PANIC)
}
