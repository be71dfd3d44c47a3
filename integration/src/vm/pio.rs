//! Port I/O: the serial log, the done port and the exception port.
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
}

/// The VMM's ports.
#[derive(Debug, Default)]
pub struct Ports {
    serial: Vec<u8>,
    truncated: bool,
    /// Writes and reads to ports nobody serves.
    pub unhandled: u64,
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
            abi::DONE_PORT => {
                let mut code = [0u8; 4];
                let n = data.len().min(4);
                code[..n].copy_from_slice(&data[..n]);
                PortEvent::Done(u32::from_le_bytes(code))
            }
            abi::EXCEPTION_PORT => PortEvent::Exception(data.first().copied().unwrap_or(0xff)),
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
        self.unhandled += 1;
        data.fill(0xff);
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
    fn unknown_ports_read_as_all_ones_and_are_counted() {
        let mut p = Ports::default();
        let mut b = [0u8; 2];
        p.read(0x80, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        p.write(0x80, &[1]);
        assert_eq!(p.unhandled, 2);
    }
}
