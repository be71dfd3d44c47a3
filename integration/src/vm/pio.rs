//! Port I/O: the serial log, the done port, the exception port, the sync
//! port (sync points where the VMM may pause the VM or plug devices; a
//! read says how many times the VM was restored) and the hot-plug port
//! (which DMA engine slots are present; a write ejects announced
//! removals).
//!
//! The serial log is bounded: a guest printing without end must not make
//! the VMM allocate without end, so past [`MAX_SERIAL_BYTES`] bytes are
//! dropped and the log says so once.

use crate::abi;

/// Most serial bytes kept per run.
pub const MAX_SERIAL_BYTES: usize = 1 << 20;

/// What a port write asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// Nothing: keep running.
    Continue,
    /// The guest ended with this result code.
    Done(u32),
    /// An exception stub ran for this vector.
    Exception(u8),
    /// The guest reached sync point N.
    Sync(u32),
    /// The guest ejected the slots of this bitmap.
    Eject(u32),
}

/// The VMM's ports.
#[derive(Debug, Default)]
pub struct Ports {
    serial: Vec<u8>,
    truncated: bool,
    /// Writes and reads to ports nobody serves.
    pub unhandled: u64,
    /// Times this VM was restored from a snapshot (read on the sync port).
    pub restores: u32,
    /// DMA engine slots present (read on the hot-plug port).
    pub present: u32,
}

/// What the ports hold that the guest can observe or that a run reports:
/// carried across a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortsState {
    /// The serial log so far.
    pub serial: Vec<u8>,
    /// Whether the serial log was truncated.
    pub truncated: bool,
    /// Unserved port accesses so far.
    pub unhandled: u64,
    /// Restores so far.
    pub restores: u32,
    /// Slots present.
    pub present: u32,
}

/// Reads a 32-bit port value from an access of any width (low bytes).
fn le32(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

impl Ports {
    /// Handles an OUT (or OUTS) of `data` to `port`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PortEvent {
        match port {
            abi::SERIAL_PORT => {
                let room = MAX_SERIAL_BYTES.saturating_sub(self.serial.len());
                self.serial.extend_from_slice(&data[..data.len().min(room)]);
                if data.len() > room && !self.truncated {
                    self.truncated = true;
                    self.serial.extend_from_slice(b"\n[serial log truncated]\n");
                }
                PortEvent::Continue
            }
            abi::DONE_PORT => PortEvent::Done(le32(data)),
            abi::EXCEPTION_PORT => PortEvent::Exception(data.first().copied().unwrap_or(0xff)),
            abi::SYNC_PORT => PortEvent::Sync(le32(data)),
            abi::HOTPLUG_PORT => PortEvent::Eject(le32(data)),
            _ => {
                self.unhandled += 1;
                PortEvent::Continue
            }
        }
    }

    /// Handles an IN from `port`: the serial line status says "ready"
    /// (for guests that poll it), everything else reads as all ones, like
    /// an empty bus.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let lsr = abi::SERIAL_PORT + 5;
        if port == lsr {
            // THRE | TEMT: the transmitter is always empty.
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = 0x60;
            }
            return;
        }
        let v = match port {
            abi::SYNC_PORT => self.restores,
            abi::HOTPLUG_PORT => self.present,
            _ => {
                self.unhandled += 1;
                data.fill(0xff);
                return;
            }
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    /// What a snapshot carries.
    pub fn state(&self) -> PortsState {
        PortsState {
            serial: self.serial.clone(),
            truncated: self.truncated,
            unhandled: self.unhandled,
            restores: self.restores,
            present: self.present,
        }
    }

    /// The ports of a VM restored from `s` (counted as one more restore);
    /// a serial log longer than [`MAX_SERIAL_BYTES`] is cut there.
    pub fn restored(s: &PortsState) -> Self {
        let mut serial = s.serial.clone();
        serial.truncate(MAX_SERIAL_BYTES + 64);
        Ports {
            serial,
            truncated: s.truncated,
            unhandled: s.unhandled,
            restores: s.restores.saturating_add(1),
            present: s.present,
        }
    }

    /// The serial output so far (invalid UTF-8 replaced).
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_bytes_are_collected_and_bounded() {
        let mut p = Ports::default();
        assert_eq!(p.write(abi::SERIAL_PORT, b"hi\n"), PortEvent::Continue);
        assert_eq!(p.serial(), "hi\n");
        p.write(abi::SERIAL_PORT, &vec![b'x'; MAX_SERIAL_BYTES]);
        p.write(abi::SERIAL_PORT, b"more");
        let s = p.serial();
        assert!(s.len() < MAX_SERIAL_BYTES + 64);
        assert_eq!(s.matches("truncated").count(), 1);
    }

    #[test]
    fn done_port_reports_the_code_of_any_width() {
        let mut p = Ports::default();
        assert_eq!(
            p.write(abi::DONE_PORT, &7u32.to_le_bytes()),
            PortEvent::Done(7)
        );
        assert_eq!(p.write(abi::DONE_PORT, &[3]), PortEvent::Done(3));
    }

    #[test]
    fn sync_and_hotplug_ports_report_restores_and_slots() {
        let mut p = Ports {
            present: 0b101,
            ..Ports::default()
        };
        assert_eq!(
            p.write(abi::SYNC_PORT, &3u32.to_le_bytes()),
            PortEvent::Sync(3)
        );
        assert_eq!(p.write(abi::HOTPLUG_PORT, &[4]), PortEvent::Eject(4));
        let mut b = [0u8; 4];
        p.read(abi::HOTPLUG_PORT, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0b101);
        let mut q = Ports::restored(&p.state());
        q.read(abi::SYNC_PORT, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        assert_eq!(q.unhandled, 0);
    }

    #[test]
    fn unknown_ports_read_as_all_ones_and_are_counted() {
        let mut p = Ports::default();
        let mut b = [0u8; 2];
        p.read(0x80, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        p.write(0x80, &[1]);
        assert_eq!(p.unhandled, 2);
    }
}
