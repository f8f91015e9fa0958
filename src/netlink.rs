//! The few rtnetlink requests flanneld needs (address, MTU + up, route),
//! spoken directly over a `NETLINK_ROUTE` socket: no `ip` processes, no
//! dependency on a large async netlink stack for four fixed messages.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const RTA_HDRLEN: usize = 4;

/// A blocking rtnetlink socket in the caller's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one netlink message: header, fixed body, then attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(msg_type: u16, flags: u16, seq: u32, body: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel fills in
        buf.extend_from_slice(body);
        buf.resize(align4(buf.len()), 0);
        Msg { buf }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = (RTA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { fd, seq: 1 })
    }

    /// Sends a request with NLM_F_ACK and waits for the kernel's answer.
    fn request(&mut self, msg: Msg) -> io::Result<()> {
        let buf = msg.finish();
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        // SAFETY: buf is a valid, initialised buffer of buf.len() bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rbuf = [0u8; 8192];
        loop {
            // SAFETY: rbuf is writable for its whole length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), rbuf.as_mut_ptr().cast(), rbuf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + NLMSG_HDRLEN <= n {
                let h = &rbuf[off..];
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let kind = u16::from_ne_bytes([h[4], h[5]]);
                let mseq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink reply",
                    ));
                }
                if kind == libc::NLMSG_ERROR as u16 && mseq == seq && len >= NLMSG_HDRLEN + 4 {
                    let e = i32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
                    return if e == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-e))
                    };
                }
                off += align4(len);
            }
        }
    }

    /// `ip addr add ADDR/PREFIX dev INDEX`; an existing address is fine.
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut body = [0u8; 8]; // ifaddrmsg
        body[0] = libc::AF_INET as u8;
        body[1] = prefix;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        let msg = Msg::new(
            libc::RTM_NEWADDR,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
            self.seq,
            &body,
        )
        .attr(libc::IFA_LOCAL, &addr.octets())
        .attr(libc::IFA_ADDRESS, &addr.octets());
        ok_if_exists(self.request(msg))
    }

    /// `ip addr del ADDR/PREFIX dev INDEX`; a missing address is fine.
    pub fn del_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut body = [0u8; 8]; // ifaddrmsg
        body[0] = libc::AF_INET as u8;
        body[1] = prefix;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        let msg = Msg::new(
            libc::RTM_DELADDR,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            self.seq,
            &body,
        )
        .attr(libc::IFA_LOCAL, &addr.octets())
        .attr(libc::IFA_ADDRESS, &addr.octets());
        match self.request(msg) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other,
        }
    }

    /// `ip link set dev INDEX mtu MTU up`.
    pub fn set_mtu_up(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut body = [0u8; 16]; // ifinfomsg
        body[0] = libc::AF_UNSPEC as u8;
        body[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        body[8..12].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        body[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        let msg = Msg::new(
            libc::RTM_NEWLINK,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            self.seq,
            &body,
        )
        .attr(libc::IFLA_MTU, &mtu.to_ne_bytes());
        self.request(msg)
    }

    /// `ip route replace DST/PREFIX dev INDEX scope global` in the main
    /// table, as flannel's udp backend installs it. flannel accepts an
    /// existing route whatever its device (EEXIST); a stale route of that
    /// prefix through another device would send the overlay's traffic
    /// elsewhere, so ours replaces it.
    pub fn add_route(&mut self, dst: Ipv4Addr, prefix: u8, index: u32) -> io::Result<()> {
        let mut body = [0u8; 12]; // rtmsg
        body[0] = libc::AF_INET as u8;
        body[1] = prefix;
        body[4] = libc::RT_TABLE_MAIN;
        body[5] = libc::RTPROT_BOOT;
        body[6] = libc::RT_SCOPE_UNIVERSE;
        body[7] = libc::RTN_UNICAST;
        let msg = Msg::new(
            libc::RTM_NEWROUTE,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE)
                as u16,
            self.seq,
            &body,
        )
        .attr(libc::RTA_DST, &dst.octets())
        .attr(libc::RTA_OIF, &index.to_ne_bytes());
        self.request(msg)
    }
}

impl Netlink {
    /// `ip route replace DST/PREFIX via GW` in the main table (the
    /// vxlan backend's DirectRouting: a peer on our L2 subnet is reached
    /// without the tunnel).
    pub fn replace_route_via(&mut self, dst: Ipv4Addr, prefix: u8, gw: Ipv4Addr) -> io::Result<()> {
        let body = route_body(prefix, libc::RT_SCOPE_UNIVERSE);
        let msg = Msg::new(
            libc::RTM_NEWROUTE,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE)
                as u16,
            self.seq,
            &body,
        )
        .attr(libc::RTA_DST, &dst.octets())
        .attr(libc::RTA_GATEWAY, &gw.octets());
        self.request(msg)
    }

    /// `ip route del DST/PREFIX via GW`; a route already gone is fine.
    pub fn del_route_via(&mut self, dst: Ipv4Addr, prefix: u8, gw: Ipv4Addr) -> io::Result<()> {
        let body = route_body(prefix, libc::RT_SCOPE_NOWHERE);
        let msg = Msg::new(
            libc::RTM_DELROUTE,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            self.seq,
            &body,
        )
        .attr(libc::RTA_DST, &dst.octets())
        .attr(libc::RTA_GATEWAY, &gw.octets());
        match self.request(msg) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }
}

/// An `rtmsg` for a unicast IPv4 route of ours in the main table.
fn route_body(prefix: u8, scope: u8) -> [u8; 12] {
    let mut body = [0u8; 12];
    body[0] = libc::AF_INET as u8;
    body[1] = prefix;
    body[4] = libc::RT_TABLE_MAIN;
    body[5] = libc::RTPROT_BOOT;
    body[6] = scope;
    body[7] = libc::RTN_UNICAST;
    body
}

fn ok_if_exists(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// The interface index of `name`.
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_is_aligned_and_sized() {
        let m = Msg::new(20, 5, 7, &[1, 2, 3, 4, 5, 6, 7, 8])
            .attr(2, &[10, 0, 0, 1])
            .attr(3, &[1])
            .finish();
        assert_eq!(m.len(), 16 + 8 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 20);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        // Attribute header: len then type.
        assert_eq!(u16::from_ne_bytes(m[24..26].try_into().unwrap()), 8);
        assert_eq!(u16::from_ne_bytes(m[26..28].try_into().unwrap()), 2);
        assert_eq!(u16::from_ne_bytes(m[32..34].try_into().unwrap()), 5);
    }
}
