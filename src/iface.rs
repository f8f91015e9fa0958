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

/// The IPv4 networks directly attached to interface `name` (its
/// addresses with their prefix lengths): hosts there are one L2 hop away.
pub fn attached_networks(name: &str) -> io::Result<Vec<ipnetwork::Ipv4Network>> {
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
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr; we read sa_family first.
        if unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string.
        if unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: family AF_INET: both are sockaddr_in.
        let (a, m) = unsafe {
            (
                &*(ifa.ifa_addr as *const libc::sockaddr_in),
                &*(ifa.ifa_netmask as *const libc::sockaddr_in),
            )
        };
        let addr = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        let prefix = u32::from_be(m.sin_addr.s_addr).leading_ones() as u8;
        if let Ok(n) = ipnetwork::Ipv4Network::new(addr, prefix) {
            out.push(n);
        }
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

/// How to pick the external interface (flannel's flags, in its order of
/// precedence): `--iface` names or addresses, else `--iface-regex`
/// patterns, else `--iface-can-reach`, else the interface that owns
/// `--public-ip`, else the default route's interface.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

/// What the host has, for [`choose`]: (name, address) pairs in kernel
/// order, the default route's interface, and the local address the kernel
/// would use towards `--iface-can-reach`.
#[derive(Debug, Clone, Default)]
pub struct Host {
    pub addrs: Vec<(String, Ipv4Addr)>,
    pub default_iface: Option<String>,
    pub reach_src: Option<Ipv4Addr>,
}

/// The external interface's (name, address) by [`Selection`]'s rules; a
/// pure function. A regex matches an interface's address first (as flannel
/// checks IPs before names), then its name.
pub fn choose(sel: &Selection, host: &Host) -> anyhow::Result<(String, Ipv4Addr)> {
    use anyhow::{bail, Context};
    let by_addr = |ip: Ipv4Addr| host.addrs.iter().find(|(_, a)| *a == ip).cloned();
    if !sel.ifaces.is_empty() {
        for want in &sel.ifaces {
            let hit = match want.parse::<Ipv4Addr>() {
                Ok(ip) => by_addr(ip),
                Err(_) => host.addrs.iter().find(|(n, _)| n == want).cloned(),
            };
            if let Some(hit) = hit {
                return Ok(hit);
            }
        }
        bail!(
            "none of --iface {:?} is an interface (or address) with an IPv4 address here",
            sel.ifaces
        );
    }
    if !sel.regexes.is_empty() {
        for pattern in &sel.regexes {
            let re = regex::Regex::new(pattern).with_context(|| {
                format!("--iface-regex {pattern:?} is not a valid regular expression")
            })?;
            let hit = host
                .addrs
                .iter()
                .find(|(_, a)| re.is_match(&a.to_string()))
                .or_else(|| host.addrs.iter().find(|(n, _)| re.is_match(n)));
            if let Some(hit) = hit {
                return Ok(hit.clone());
            }
        }
        bail!(
            "no interface name or IPv4 address matches --iface-regex {:?}",
            sel.regexes
        );
    }
    if let Some(dst) = sel.can_reach {
        let Some(src) = host.reach_src else {
            bail!("no route to --iface-can-reach {dst}");
        };
        return by_addr(src).with_context(|| {
            format!("--iface-can-reach {dst}: the route's source {src} is on no interface")
        });
    }
    // A PublicIP no interface has (a NAT address) falls back to the
    // default route's interface.
    if let Some(hit) = sel.public_ip.and_then(by_addr) {
        return Ok(hit);
    }
    let Some(name) = &host.default_iface else {
        bail!(
            "no default route to find the external interface: pass --iface NAME or --iface ADDRESS"
        );
    };
    host.addrs
        .iter()
        .find(|(n, _)| n == name)
        .cloned()
        .with_context(|| {
            format!("default route interface {name} has no IPv4 address: pass --iface")
        })
}

/// The local address the kernel would send from towards `dst` (a UDP
/// connect: no packet is sent).
fn source_towards(dst: Ipv4Addr) -> io::Result<Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect((dst, 9))?;
    match s.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        _ => Err(io::Error::other("not IPv4")),
    }
}

/// Picks the external interface (see [`Selection`]) on this host.
pub fn find_external(sel: &Selection) -> anyhow::Result<ExternalIface> {
    use anyhow::Context;
    let host = Host {
        addrs: ipv4_addresses().context("listing interface addresses")?,
        default_iface: std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|r| default_route_iface(&r)),
        reach_src: sel.can_reach.and_then(|d| source_towards(d).ok()),
    };
    let (name, addr) = choose(sel, &host)?;
    Ok(ExternalIface {
        mtu: mtu(&name).with_context(|| format!("reading the MTU of {name}"))?,
        name,
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            addrs: vec![
                ("lo".into(), Ipv4Addr::new(127, 0, 0, 1)),
                ("eth0".into(), Ipv4Addr::new(192, 168, 1, 5)),
                ("ens7".into(), Ipv4Addr::new(10, 0, 0, 5)),
                ("wg0".into(), Ipv4Addr::new(172, 20, 0, 1)),
            ],
            default_iface: Some("eth0".into()),
            reach_src: Some(Ipv4Addr::new(172, 20, 0, 1)),
        }
    }

    fn pick(sel: Selection) -> anyhow::Result<String> {
        choose(&sel, &host()).map(|(n, _)| n)
    }

    #[test]
    fn external_interface_follows_flannels_precedence() {
        let s = |f: fn(&mut Selection)| {
            let mut x = Selection::default();
            f(&mut x);
            x
        };
        assert_eq!(pick(s(|_| {})).unwrap(), "eth0");
        assert_eq!(
            pick(s(|x| x.ifaces = vec!["nope".into(), "10.0.0.5".into()])).unwrap(),
            "ens7"
        );
        assert!(pick(s(|x| x.ifaces = vec!["nope".into()])).is_err());
        // Regexes: addresses first, then names; the first regex that matches wins.
        assert_eq!(
            pick(s(|x| x.regexes = vec!["^10\\.".into()])).unwrap(),
            "ens7"
        );
        assert_eq!(
            pick(s(|x| x.regexes = vec!["^zz".into(), "^ens".into()])).unwrap(),
            "ens7"
        );
        assert!(pick(s(|x| x.regexes = vec!["^zz".into()])).is_err());
        let bad = pick(s(|x| x.regexes = vec!["(".into()])).unwrap_err();
        assert!(format!("{bad:#}").contains("--iface-regex"), "{bad:#}");
        // --iface wins over the regex, the regex over --iface-can-reach.
        assert_eq!(
            pick(s(|x| {
                x.ifaces = vec!["eth0".into()];
                x.regexes = vec!["^ens".into()];
            }))
            .unwrap(),
            "eth0"
        );
        assert_eq!(
            pick(s(|x| x.can_reach = Some(Ipv4Addr::new(172, 20, 9, 9)))).unwrap(),
            "wg0"
        );
        // --public-ip picks its owner; an address nobody has falls back.
        assert_eq!(
            pick(s(|x| x.public_ip = Some(Ipv4Addr::new(10, 0, 0, 5)))).unwrap(),
            "ens7"
        );
        assert_eq!(
            pick(s(|x| x.public_ip = Some(Ipv4Addr::new(203, 0, 113, 7)))).unwrap(),
            "eth0"
        );
    }

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
