//! COM1: vm-superio's 16550 on ports 0x3f8–0x3ff, its interrupt through an
//! eventfd (the VMM registers it as the irqfd of ISA IRQ 4), its output
//! kept as the guest's console log and, if asked, copied to the VMM's
//! stdout as it arrives.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Most console bytes kept: the log in an error stays readable and a
/// chatty guest cannot grow the VMM without bound.
pub const MAX_LOG: usize = 4 << 20;

/// The serial line's interrupt: an eventfd the VMM wires to the irqchip.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The console log, shared with the VMM.
#[derive(Clone, Debug, Default)]
pub struct ConsoleLog(Arc<Mutex<Vec<u8>>>);

impl ConsoleLog {
    /// The log so far, lossily decoded.
    pub fn text(&self) -> String {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&v).replace('\r', "")
    }
}

/// Where the 16550's output goes.
#[derive(Debug)]
pub struct ConsoleOut {
    log: ConsoleLog,
    echo: bool,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut v = self.log.0.lock().unwrap_or_else(|p| p.into_inner());
            let room = MAX_LOG.saturating_sub(v.len());
            v.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        if self.echo {
            // The console copy is best effort: a closed stdout must not
            // stop the guest.
            let _ = std::io::stdout().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.echo {
            let _ = std::io::stdout().flush();
        }
        Ok(())
    }
}

/// COM1 on the port bus.
pub struct Console {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console raising `irq`, logging into `log`, echoing to stdout if
    /// `echo`.
    pub fn new(irq: EventFd, log: ConsoleLog, echo: bool) -> Self {
        Console {
            serial: Serial::new(IrqTrigger(irq), ConsoleOut { log, echo }),
        }
    }
}

impl MutDevicePio for Console {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // The 16550 has byte registers; wider reads see the register
        // repeated, as ISA byte lanes would give.
        let v = u8::try_from(offset).map_or(0xff, |o| self.serial.read(o));
        data.fill(v);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.serial.write(o, v) {
            log::debug!("serial: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_log_and_raise_the_line_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let log = ConsoleLog::default();
        let mut c = Console::new(irq.try_clone().unwrap(), log.clone(), false);
        let base = PioAddress(0x3f8);
        c.pio_write(base, 1, &[0x02]); // IER: THR empty interrupt
        for b in b"ok\r\n" {
            c.pio_write(base, 0, &[*b]);
        }
        assert_eq!(log.text(), "ok\n");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        c.pio_read(base, 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn the_log_is_bounded() {
        let mut out = ConsoleOut {
            log: ConsoleLog::default(),
            echo: false,
        };
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..6 {
            out.write_all(&chunk).unwrap();
        }
        assert_eq!(out.log.text().len(), MAX_LOG);
    }
}
