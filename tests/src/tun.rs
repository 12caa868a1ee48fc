//! A tun device (IFF_TUN, no packet information): an L3 link, as wireguard, ipip or ppp are
//! (ARPHRD_NONE, no link header). A packet written to it is one the host receives on that
//! link; a packet the host sends out of it is read back here.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::netns::LINK_PREFIX;

/// The device lives as long as this fd: dropping it removes the interface (it is not
/// persistent), so a killed test leaves nothing behind either.
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    pub fn new(name: &str) -> Self {
        assert!(name.starts_with(LINK_PREFIX), "interface {name} lacks the test prefix");
        assert!(name.len() < libc::IFNAMSIZ, "interface name {name} is too long");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        /// struct ifreq as TUNSETIFF reads it: the name, then the flags (a short).
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IFNAMSIZ],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) one struct ifreq, alive for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
        Tun { file, name: name.to_owned() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands `packet` (an IP packet) to the host as if it had arrived on this link.
    pub fn send(&self, packet: &[u8]) {
        let written = (&self.file)
            .write(packet)
            .unwrap_or_else(|e| panic!("write a packet into {}: {e}", self.name));
        assert_eq!(written, packet.len(), "short write into {}", self.name);
    }

    /// Reads what the host sends out of this link until `wanted` holds for a packet (true)
    /// or `within` passes (false).
    pub fn receive_until(&self, within: Duration, wanted: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            match (&self.file).read(&mut buf) {
                Ok(n) if wanted(&buf[..n]) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("read from {}: {e}", self.name),
            }
        }
        false
    }
}
