//! `--ip-masq`: flannel's iptables rules, same chains and comments, so
//! operators' tooling keeps working. Rendering and the "is the host still
//! in the state we want" check are pure; applying is one
//! `iptables-restore --noflush` per change (not one command per rule).
//! With Debian's iptables-nft these land in nftables.

use ipnetwork::Ipv4Network;
use std::io::Write;
use std::process::{Command, Stdio};

pub const POSTRTG: &str = "FLANNEL-POSTRTG";
pub const FWD: &str = "FLANNEL-FWD";
const MASQ: &str = r#"-m comment --comment "flanneld masq""#;
const FORWARD: &str = r#"-m comment --comment "flanneld forward""#;
/// kube-proxy's mark: never masquerade what it already NATs.
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// The rules of one table, as `iptables-save` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    /// (chain to hook into, the jump rule we add there)
    pub jump: (&'static str, String),
    pub chain: &'static str,
    pub rules: Vec<String>,
}

/// flannel's MasqRules (and ForwardRules when `forward`) for `network` and
/// this host's `subnet`, plus one flannel lacks: a pod's UDP datagram to
/// the backend's `port` is never masqueraded. Masqueraded, it would leave
/// from its node's PublicIP, and a receiver that checks the sender (ours
/// does) would take the forged inner packet as its node's traffic: any pod
/// could inject packets into other hosts' subnets.
pub fn rules(
    network: Ipv4Network,
    subnet: Ipv4Network,
    forward: bool,
    port: u16,
) -> Vec<TableRules> {
    let (n, s) = (network.to_string(), subnet.to_string());
    let mut out = vec![TableRules {
        table: "nat",
        jump: ("POSTROUTING", format!("-A POSTROUTING {MASQ} -j {POSTRTG}")),
        chain: POSTRTG,
        rules: vec![
            format!("-A {POSTRTG} -m mark --mark {KUBE_PROXY_MARK} {MASQ} -j RETURN"),
            format!("-A {POSTRTG} -s {n} -p udp -m udp --dport {port} {MASQ} -j RETURN"),
            format!("-A {POSTRTG} -s {s} -d {n} {MASQ} -j RETURN"),
            format!("-A {POSTRTG} -s {n} -d {s} {MASQ} -j RETURN"),
            format!("-A {POSTRTG} ! -s {n} -d {s} {MASQ} -j RETURN"),
            format!("-A {POSTRTG} -s {n} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully"),
            format!("-A {POSTRTG} ! -s {n} -d {n} {MASQ} -j MASQUERADE --random-fully"),
        ],
    }];
    if forward {
        out.push(TableRules {
            table: "filter",
            jump: ("FORWARD", format!("-A FORWARD {FORWARD} -j {FWD}")),
            chain: FWD,
            rules: vec![
                format!("-A {FWD} -s {n} {FORWARD} -j ACCEPT"),
                format!("-A {FWD} -d {n} {FORWARD} -j ACCEPT"),
            ],
        });
    }
    out
}

/// Whether `saved` (`iptables-save -t TABLE` output) already holds the
/// jump and exactly our chain's rules, in order.
pub fn in_place(t: &TableRules, saved: &str) -> bool {
    let lines: Vec<&str> = saved.lines().map(str::trim).collect();
    let ours: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with(&format!("-A {} ", t.chain)))
        .collect();
    let jumps = lines.iter().filter(|l| **l == t.jump.1).count();
    jumps == 1 && ours == t.rules.iter().map(String::as_str).collect::<Vec<_>>()
}

/// The `iptables-restore --noflush` input that (re)creates our chain with
/// its rules (declaring it flushes it) and adds the jump when missing.
pub fn restore_input(t: &TableRules, saved: &str) -> String {
    let mut s = format!("*{}\n:{} - [0:0]\n", t.table, t.chain);
    let jumps = saved.lines().filter(|l| l.trim() == t.jump.1).count();
    // Duplicates (someone re-added it): remove the extras, keep one first.
    for _ in 1..jumps.max(1) {
        s.push_str(&t.jump.1.replacen("-A ", "-D ", 1));
        s.push('\n');
    }
    if jumps == 0 {
        // First in the chain, so our rules run before other NAT rules.
        s.push_str(&t.jump.1.replacen(
            &format!("-A {}", t.jump.0),
            &format!("-I {} 1", t.jump.0),
            1,
        ));
        s.push('\n');
    }
    for r in &t.rules {
        s.push_str(r);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    s
}

/// The input that removes the jump(s) and our chain.
pub fn removal_input(t: &TableRules, saved: &str) -> Option<String> {
    let jumps = saved.lines().filter(|l| l.trim() == t.jump.1).count();
    let has_chain = saved
        .lines()
        .any(|l| l.starts_with(&format!(":{} ", t.chain)));
    if jumps == 0 && !has_chain {
        return None;
    }
    let mut s = format!("*{}\n", t.table);
    for _ in 0..jumps {
        s.push_str(&t.jump.1.replacen("-A ", "-D ", 1));
        s.push('\n');
    }
    if has_chain {
        s.push_str(&format!("-F {0}\n-X {0}\n", t.chain));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

fn save(table: &str) -> std::io::Result<String> {
    let out = Command::new("iptables-save").args(["-t", table]).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "iptables-save -t {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` with `input` on stdin; its stderr becomes the error.
fn feed(program: &str, args: &[&str], input: &str) -> std::io::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(std::io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            err.trim()
        )));
    }
    Ok(())
}

/// How long `iptables-restore` waits for the xtables lock that kube-proxy,
/// Docker or firewalld may hold (Go flanneld passes `--wait` too); bounded,
/// so a stuck holder delays a resync instead of blocking it for ever.
const XTABLES_WAIT_SECS: &str = "5";

fn restore(input: &str) -> std::io::Result<()> {
    feed(
        "iptables-restore",
        &[&format!("--wait={XTABLES_WAIT_SECS}"), "--noflush"],
        input,
    )
}

/// Makes the host match `want`; returns how many tables had to be fixed.
pub fn ensure(want: &[TableRules]) -> std::io::Result<usize> {
    let mut fixed = 0;
    for t in want {
        let saved = save(t.table)?;
        if !in_place(t, &saved) {
            restore(&restore_input(t, &saved))?;
            fixed += 1;
        }
    }
    Ok(fixed)
}

/// Removes our rules (clean shutdown).
pub fn remove(want: &[TableRules]) -> std::io::Result<()> {
    for t in want {
        if let Some(input) = removal_input(t, &save(t.table)?) {
            restore(&input)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Vec<TableRules> {
        rules(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.34.0/24".parse().unwrap(),
            true,
            8285,
        )
    }

    #[test]
    fn rules_match_flannels_text() {
        let t = r();
        assert_eq!(
            t[0].jump.1,
            r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#
        );
        assert_eq!(
            t[0].rules,
            vec![
                r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.5.0.0/16 -p udp -m udp --dport 8285 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.5.34.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
                r#"-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
                r#"-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
            ]
        );
        assert_eq!(
            t[1].jump.1,
            r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#
        );
        assert_eq!(
            t[1].rules[1],
            r#"-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#
        );
        assert_eq!(
            rules(
                "10.5.0.0/16".parse().unwrap(),
                "10.5.34.0/24".parse().unwrap(),
                false,
                8285
            )
            .len(),
            1
        );
    }

    #[test]
    fn restore_input_creates_and_then_is_in_place() {
        let t = &r()[0];
        let empty = "*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert!(!in_place(t, empty));
        let input = restore_input(t, empty);
        assert!(input.starts_with("*nat\n:FLANNEL-POSTRTG - [0:0]\n-I POSTROUTING 1 -m comment"));
        assert!(input.ends_with("COMMIT\n"));
        // What iptables-save prints afterwards.
        let after = format!(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n{}\n{}\nCOMMIT\n",
            t.jump.1,
            t.rules.join("\n")
        );
        assert!(in_place(t, &after));
        // Restoring again keeps one jump.
        assert!(!restore_input(t, &after).contains("-I POSTROUTING"));
        // A flushed chain or a lost jump is not in place.
        assert!(!in_place(t, &format!("{}\n", t.jump.1)));
        let removal = removal_input(t, &after).unwrap();
        assert!(removal
            .contains("-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"));
        assert!(removal.contains("-X FLANNEL-POSTRTG"));
        assert_eq!(removal_input(t, empty), None);
    }
}

/// The nftables table used with `EnableNFTables` (flannel's name for it).
pub const NFT_TABLE: &str = "flannel-ipv4";

/// flannel's rules as one nft script in table `ip flannel-ipv4`: applying
/// it replaces the table atomically (declare, delete, define).
pub fn nft_script(
    network: Ipv4Network,
    subnet: Ipv4Network,
    masq: bool,
    forward: bool,
    port: u16,
) -> String {
    let (n, s) = (network.to_string(), subnet.to_string());
    let mut out =
        format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\ntable ip {NFT_TABLE} {{\n");
    if masq {
        out.push_str(&format!(
            "  chain postrtg {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   meta mark & 0x4000 == 0x4000 return comment \"flanneld masq\"\n\
             \x20   ip saddr {n} udp dport {port} return comment \"flanneld masq\"\n\
             \x20   ip saddr {s} ip daddr {n} return comment \"flanneld masq\"\n\
             \x20   ip saddr {n} ip daddr {s} return comment \"flanneld masq\"\n\
             \x20   ip saddr != {n} ip daddr {s} return comment \"flanneld masq\"\n\
             \x20   ip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random comment \"flanneld masq\"\n\
             \x20   ip saddr != {n} ip daddr {n} masquerade fully-random comment \"flanneld masq\"\n  }}\n"
        ));
    }
    if forward {
        out.push_str(&format!(
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
             \x20   ip saddr {n} accept comment \"flanneld forward\"\n\
             \x20   ip daddr {n} accept comment \"flanneld forward\"\n  }}\n"
        ));
    }
    out.push_str("}\n");
    out
}

/// Rules kept in place on the host, by either backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSet {
    Iptables(Vec<TableRules>),
    /// The script, and how many of our rules `nft list table` must show.
    Nft {
        script: String,
        rules: usize,
    },
}

impl RuleSet {
    /// What the options ask for; `None` when there is nothing to keep.
    pub fn new(
        network: Ipv4Network,
        subnet: Ipv4Network,
        masq: bool,
        forward: bool,
        nft: bool,
        port: u16,
    ) -> Option<Self> {
        if !masq && !forward {
            return None;
        }
        Some(if nft {
            let rules = 7 * masq as usize + 2 * forward as usize;
            RuleSet::Nft {
                script: nft_script(network, subnet, masq, forward, port),
                rules,
            }
        } else {
            let mut t = rules(network, subnet, forward, port);
            if !masq {
                t.retain(|t| t.table != "nat");
            }
            RuleSet::Iptables(t)
        })
    }

    /// The same rules masquerading without `--random-fully` /
    /// `fully-random` (flannel's `--ip-masq-fully-random-disable`, for
    /// kernels or middleboxes that mishandle randomised source ports).
    pub fn without_random_fully(self) -> Self {
        match self {
            RuleSet::Iptables(mut t) => {
                for table in &mut t {
                    for r in &mut table.rules {
                        *r = r.replace(" --random-fully", "");
                    }
                }
                RuleSet::Iptables(t)
            }
            RuleSet::Nft { script, rules } => RuleSet::Nft {
                script: script.replace(" fully-random", ""),
                rules,
            },
        }
    }

    /// Makes the host match; returns whether anything had to be fixed.
    pub fn ensure(&self) -> std::io::Result<bool> {
        match self {
            RuleSet::Iptables(t) => ensure(t).map(|n| n > 0),
            RuleSet::Nft { script, rules } => {
                let listed = Command::new("nft")
                    .args(["list", "table", "ip", NFT_TABLE])
                    .output()?;
                let text = String::from_utf8_lossy(&listed.stdout);
                let ours = text.matches("comment \"flanneld ").count();
                if listed.status.success()
                    && ours == *rules
                    && text.contains(&script_marker(script))
                {
                    return Ok(false);
                }
                nft(script)?;
                Ok(true)
            }
        }
    }

    pub fn remove(&self) -> std::io::Result<()> {
        match self {
            RuleSet::Iptables(t) => remove(t),
            RuleSet::Nft { .. } => {
                let st = Command::new("nft")
                    .args(["delete", "table", "ip", NFT_TABLE])
                    .stderr(Stdio::null())
                    .status()?;
                let _ = st; // already gone is fine
                Ok(())
            }
        }
    }
}

/// A line that identifies this script's subnet in `nft list` output.
fn script_marker(script: &str) -> String {
    script
        .lines()
        .find(|l| l.contains("ip saddr") && !l.contains("!=") && !l.contains("dport"))
        .map(|l| {
            l.trim()
                .split(" return")
                .next()
                .unwrap_or("")
                .split(" accept")
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn nft(script: &str) -> std::io::Result<()> {
    feed("nft", &["-f", "-"], script)
}

#[cfg(test)]
mod nft_tests {
    use super::*;

    #[test]
    fn nft_script_replaces_the_table_with_flannels_rules() {
        let s = nft_script(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.34.0/24".parse().unwrap(),
            true,
            true,
            8472,
        );
        assert!(s.starts_with(
            "table ip flannel-ipv4\ndelete table ip flannel-ipv4\ntable ip flannel-ipv4 {"
        ));
        assert!(s.contains("type nat hook postrouting priority srcnat"));
        assert!(s.contains("ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment \"flanneld masq\""));
        assert!(s.contains("ip daddr 10.5.0.0/16 accept comment \"flanneld forward\""));
        assert!(s.contains("ip saddr 10.5.0.0/16 udp dport 8472 return comment \"flanneld masq\""));
        assert_eq!(s.matches("comment \"flanneld").count(), 9);
        assert_eq!(
            script_marker(&s),
            "ip saddr 10.5.34.0/24 ip daddr 10.5.0.0/16"
        );
        assert!(RuleSet::new(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.34.0/24".parse().unwrap(),
            false,
            false,
            true,
            8285
        )
        .is_none());
        match RuleSet::new(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.34.0/24".parse().unwrap(),
            false,
            true,
            false,
            8285,
        )
        .unwrap()
        {
            RuleSet::Iptables(t) => assert_eq!(t.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fully_random_can_be_disabled_on_both_backends() {
        let (n, s) = (
            "10.5.0.0/16".parse().unwrap(),
            "10.5.34.0/24".parse().unwrap(),
        );
        let text = |r: RuleSet| match r {
            RuleSet::Iptables(t) => t
                .iter()
                .flat_map(|t| t.rules.clone())
                .collect::<Vec<_>>()
                .join("\n"),
            RuleSet::Nft { script, .. } => script,
        };
        let ipt = RuleSet::new(n, s, true, true, false, 8285).unwrap();
        assert_eq!(text(ipt.clone()).matches("--random-fully").count(), 2);
        let off = text(ipt.without_random_fully());
        assert!(
            !off.contains("random-fully") && off.matches("-j MASQUERADE").count() == 2,
            "{off}"
        );
        let nft = RuleSet::new(n, s, true, true, true, 8285).unwrap();
        assert_eq!(text(nft.clone()).matches("fully-random").count(), 2);
        let off = text(nft.without_random_fully());
        assert!(
            !off.contains("fully-random") && off.matches(" masquerade comment").count() == 2,
            "{off}"
        );
    }
}
