//! Batched UDP I/O: `recvmmsg`/`sendmmsg` over buffers allocated once per
//! worker. Nothing here allocates per packet.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

/// Packets per batch.
pub const BATCH: usize = 64;
/// Bytes per packet slot: the largest IPv4 packet. Untouched pages of a
/// slot are never faulted in, so resident memory follows the real sizes.
pub const SLOT: usize = 65536;

/// `BATCH` packet buffers in one allocation, with their lengths and the
/// peer address of each.
pub struct Slots {
    buf: Vec<u8>,
    pub len: [usize; BATCH],
    pub addr: [SocketAddrV4; BATCH],
}

impl Default for Slots {
    fn default() -> Self {
        Self::new()
    }
}

impl Slots {
    pub fn new() -> Self {
        Slots {
            buf: vec![0u8; BATCH * SLOT],
            len: [0; BATCH],
            addr: [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); BATCH],
        }
    }

    /// The whole slot `i`, for reading into.
    #[inline]
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    /// The packet in slot `i`.
    #[inline]
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.buf[i * SLOT..i * SLOT + self.len[i]]
    }

    #[inline]
    pub fn packet_mut(&mut self, i: usize) -> &mut [u8] {
        let len = self.len[i];
        &mut self.buf[i * SLOT..i * SLOT + len]
    }
}

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

/// The kernel-facing message headers of one batch. Pointers into `Slots`
/// are set right before each syscall, so the structs never dangle.
pub struct Mmsg {
    hdrs: [libc::mmsghdr; BATCH],
    iovs: [libc::iovec; BATCH],
    names: [libc::sockaddr_in; BATCH],
    /// Slot index of each queued outgoing message.
    queue: [u8; BATCH],
    queued: usize,
}

// SAFETY: the raw pointers inside are only meaningful during a syscall made
// by the owning thread; they are rewritten before every use.
unsafe impl Send for Mmsg {}

impl Default for Mmsg {
    fn default() -> Self {
        Self::new()
    }
}

impl Mmsg {
    pub fn new() -> Self {
        // SAFETY: these are plain C structs; all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    }

    /// Receives up to `BATCH` datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: RawFd, slots: &mut Slots) -> io::Result<usize> {
        for i in 0..BATCH {
            let s = slots.slot_mut(i);
            self.iovs[i] = libc::iovec {
                iov_base: s.as_mut_ptr().cast(),
                iov_len: s.len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs[..BATCH] point at valid buffers owned by self/slots.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            let truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // A truncated datagram fails the length check downstream.
            slots.len[i] = if truncated {
                0
            } else {
                self.hdrs[i].msg_len as usize
            };
            slots.addr[i] = from_sockaddr(&self.names[i]);
        }
        Ok(n)
    }

    /// Forgets queued messages.
    pub fn clear(&mut self) {
        self.queued = 0;
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues slot `i` to be sent to `slots.addr[i]`.
    #[inline]
    pub fn queue(&mut self, i: usize) {
        self.queue[self.queued] = i as u8;
        self.queued += 1;
    }

    /// Sends every queued message with as few `sendmmsg` calls as the
    /// kernel allows. Returns (sent, failed); a message the kernel refuses
    /// is skipped and counted, the rest still go out.
    pub fn send(&mut self, fd: RawFd, slots: &mut Slots) -> (usize, usize) {
        let total = self.queued;
        for k in 0..total {
            let i = self.queue[k] as usize;
            self.names[k] = to_sockaddr(slots.addr[i]);
            let p = slots.packet_mut(i);
            self.iovs[k] = libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            };
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = (&mut self.names[k] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let (mut sent, mut failed) = (0usize, 0usize);
        while sent + failed < total {
            let at = sent + failed;
            // SAFETY: hdrs[at..total] were filled above and point at live buffers.
            let n =
                unsafe { libc::sendmmsg(fd, self.hdrs[at..].as_mut_ptr(), (total - at) as u32, 0) };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // Socket buffer full: wait until writable, then retry.
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    if pfd.revents & libc::POLLOUT == 0 {
                        failed = total - sent;
                    }
                }
                // This message cannot be sent (e.g. unreachable peer): skip it.
                _ => failed += 1,
            }
        }
        self.queued = 0;
        (sent, failed)
    }
}
