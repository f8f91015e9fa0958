//! Finding the external interface: by `--iface` (name or address) or the
//! interface of the default route, with its IPv4 address and MTU. All of
//! these read the calling thread's network namespace.

use std::io;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIface {
    pub name: String,
    pub addr: Ipv4Addr,
    pub mtu: u32,
}

/// The interface of the IPv4 default route, from `/proc/net/route` text.
pub fn default_route_iface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (cols.len() >= 8 && cols[1] == "00000000" && cols[7] == "00000000")
            .then(|| cols[0].to_string())
    })
}

/// All (interface name, IPv4 address) pairs, in the kernel's order.
pub fn ipv4_addresses() -> io::Result<Vec<(String, Ipv4Addr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr; we read sa_family first.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if fam == libc::AF_INET {
                // SAFETY: family AF_INET means it is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                // SAFETY: ifa_name is a NUL-terminated string.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
                out.push((
                    name.to_string_lossy().into_owned(),
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                ));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The MTU of interface `name`.
pub fn mtu(name: &str) -> io::Result<u32> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFMTU reads ifr_name and writes ifru_mtu within ifr.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the mtu member.
    Ok(unsafe { ifr.ifr_ifru.ifru_mtu } as u32)
}

/// Picks the external interface as flannel does: the first `--iface` entry
/// (a name or an address) that exists, else the interface that owns
/// `--public-ip`, else the default route's interface.
pub fn find_external(
    ifaces: &[String],
    public_ip: Option<Ipv4Addr>,
) -> anyhow::Result<ExternalIface> {
    use anyhow::{bail, Context};
    let addrs = ipv4_addresses().context("listing interface addresses")?;
    let pick = |name: &str, addr: Ipv4Addr| -> anyhow::Result<ExternalIface> {
        Ok(ExternalIface {
            name: name.to_string(),
            addr,
            mtu: mtu(name).with_context(|| format!("reading the MTU of {name}"))?,
        })
    };
    if !ifaces.is_empty() {
        for want in ifaces {
            if let Ok(ip) = want.parse::<Ipv4Addr>() {
                if let Some((n, a)) = addrs.iter().find(|(_, a)| *a == ip) {
                    return pick(n, *a);
                }
            } else if let Some((n, a)) = addrs.iter().find(|(n, _)| n == want) {
                return pick(n, *a);
            }
        }
        bail!(
            "none of --iface {:?} is an interface (or address) with an IPv4 address here",
            ifaces
        );
    }
    // As flannel: without --iface, --public-ip picks the interface that owns
    // it. A PublicIP no interface has (a NAT address) falls back to the
    // default route's interface.
    if let Some(ip) = public_ip {
        if let Some((n, a)) = addrs.iter().find(|(_, a)| *a == ip) {
            return pick(n, *a);
        }
    }
    let routes = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    let Some(name) = default_route_iface(&routes) else {
        bail!(
            "no default route to find the external interface: pass --iface NAME or --iface ADDRESS"
        );
    };
    let Some((_, a)) = addrs.iter().find(|(n, _)| *n == name) else {
        bail!("default route interface {name} has no IPv4 address: pass --iface");
    };
    pick(&name, *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_is_found_in_proc_net_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_iface(t), Some("eth0".into()));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }

    #[test]
    fn loopback_has_an_mtu() {
        assert!(mtu("lo").unwrap() >= 1500);
        assert!(mtu("no-such-if0").is_err());
    }
}
