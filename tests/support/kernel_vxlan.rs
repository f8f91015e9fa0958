//! A Go-flanneld-like vxlan node made of the kernel's own VXLAN device, for
//! testing our userspace vxlan backend against the real thing: a
//! `flannel.<VNI>` device (`nolearning`, MTU iface − 50, the subnet's .0/32),
//! a lease with flannel's BackendData, and per peer lease — in flannel's
//! order — a permanent neighbour, a permanent FDB entry and an onlink route.

use super::{key_of, sh, Bed, PREFIX};
use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;

pub struct KernelNode {
    pub host: usize,
    pub subnet: Ipv4Network,
    pub mac: String,
    pub dev: String,
    pub vni: u32,
    /// Peers programmed: (subnet, PublicIP, VtepMAC).
    pub programmed: Vec<(Ipv4Network, Ipv4Addr, String)>,
}

impl KernelNode {
    /// Makes host `host` of `bed` a kernel vxlan node holding `subnet`
    /// (VNI `vni`, UDP port `port`), and writes its lease.
    pub fn new(bed: &Bed, host: usize, subnet: &str, vni: u32, port: u16) -> KernelNode {
        let ns = bed.ns(host);
        let ip = bed.hosts[host].ip;
        let subnet: Ipv4Network = subnet.parse().unwrap();
        let dev = format!("flannel.{vni}");
        let mac = format!(
            "0a:58:0a:{:02x}:{:02x}:{:02x}",
            host,
            subnet.ip().octets()[2],
            vni & 0xff
        );
        sh(&[
            "ip",
            "-n",
            &ns,
            "link",
            "add",
            &dev,
            "type",
            "vxlan",
            "id",
            &vni.to_string(),
            "local",
            &ip.to_string(),
            "dev",
            "eth0",
            "nolearning",
            "dstport",
            &port.to_string(),
        ]);
        sh(&[
            "ip", "-n", &ns, "link", "set", &dev, "address", &mac, "mtu", "1450", "up",
        ]);
        // A veth hands the next namespace a packet whose checksums are
        // still to be filled (CHECKSUM_PARTIAL): the kernel trusts it, but
        // a userspace receiver sees the inner TCP checksum unfinished. A
        // real NIC finishes it before the wire; so does the kernel when the
        // device cannot: turn the veth's checksum offload off.
        sh(&[
            "ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/32", subnet.network()),
            "dev",
            &dev,
        ]);
        let node = KernelNode {
            host,
            subnet,
            mac,
            dev,
            vni,
            programmed: Vec::new(),
        };
        bed.put(&key_of(subnet), &node.lease_value(ip));
        node
    }

    /// flannel's vxlan lease value.
    pub fn lease_value(&self, ip: Ipv4Addr) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":{},"VtepMAC":"{}"}}}}"#,
            self.vni, self.mac
        )
    }

    /// Reads every vxlan lease from etcd and programs those of peers, as
    /// flannel's handleSubnetEvents does (replacing what changed, removing
    /// what is gone). With `neigh` false no neighbour entry is written:
    /// the kernel then resolves a peer's .0 with ARP over an all-zeros FDB
    /// entry towards it.
    pub fn sync(&mut self, bed: &Bed, neigh: bool) {
        let ns = bed.ns(self.host);
        let mut want = Vec::new();
        for (key, value) in bed.leases() {
            let Some(sfx) = key.strip_prefix(&format!("{PREFIX}/subnets/")) else {
                continue;
            };
            let sn: Ipv4Network = sfx.replacen('-', "/", 1).parse().unwrap();
            if sn == self.subnet {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&value).unwrap();
            if v["BackendType"] != "vxlan" {
                continue;
            }
            // flannel skips a lease whose BackendData does not decode.
            let Some(mac) = v["BackendData"]["VtepMAC"].as_str() else {
                continue;
            };
            if mac.parse::<flannel::wire::ether::Mac>().is_err()
                || !v["BackendData"]["VNI"].is_u64()
            {
                continue;
            }
            let ip: Ipv4Addr = v["PublicIP"].as_str().unwrap().parse().unwrap();
            want.push((sn, ip, mac.to_string()));
        }
        for old in std::mem::take(&mut self.programmed) {
            if !want.contains(&old) {
                self.unprogram(&ns, &old);
            }
        }
        for (sn, ip, mac) in &want {
            let gw = sn.network().to_string();
            if neigh {
                sh(&[
                    "ip",
                    "-n",
                    &ns,
                    "neigh",
                    "replace",
                    &gw,
                    "lladdr",
                    mac,
                    "dev",
                    &self.dev,
                    "nud",
                    "permanent",
                ]);
            } else {
                sh(&[
                    "bridge",
                    "-n",
                    &ns,
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    &self.dev,
                    "dst",
                    &ip.to_string(),
                    "self",
                    "permanent",
                ]);
            }
            sh(&[
                "bridge",
                "-n",
                &ns,
                "fdb",
                "replace",
                mac,
                "dev",
                &self.dev,
                "dst",
                &ip.to_string(),
                "self",
                "permanent",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "replace",
                &sn.to_string(),
                "via",
                &gw,
                "dev",
                &self.dev,
                "onlink",
            ]);
        }
        self.programmed = want;
    }

    fn unprogram(&self, ns: &str, (sn, _, mac): &(Ipv4Network, Ipv4Addr, String)) {
        let gw = sn.network().to_string();
        let _ = std::process::Command::new("ip")
            .args(["-n", ns, "route", "del", &sn.to_string()])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["-n", ns, "neigh", "del", &gw, "dev", &self.dev])
            .status();
        let _ = std::process::Command::new("bridge")
            .args(["-n", ns, "fdb", "del", mac, "dev", &self.dev, "self"])
            .status();
    }
}
