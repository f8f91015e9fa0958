//! `flanneld mk-docker-opts`: flannel's `mk-docker-opts.sh` as a pure
//! function (and a tiny I/O wrapper in main): Docker daemon options from
//! subnet.env. Same options and output; without the script's bug where
//! `set | grep DOCKER_OPT_` also matched its own usage text.

use ipnetwork::Ipv4Network;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerOptsArgs {
    /// `-i`: each option as its own variable.
    pub individual: bool,
    /// `-c`: all options in one variable.
    pub combined: bool,
    /// `-k`: the combined variable's name.
    pub combined_key: String,
    /// `-m`: no `--ip-masq` option.
    pub no_ipmasq: bool,
}

pub use crate::subnet_env::vars as parse_env;

/// The Docker env file's text. `existing` is the combined key's current
/// value from the environment (the script starts from it).
pub fn render(
    env: &BTreeMap<String, String>,
    a: &DockerOptsArgs,
    existing: &str,
) -> Result<String, String> {
    let (individual, combined) = if !a.individual && !a.combined {
        (true, true)
    } else {
        (a.individual, a.combined)
    };
    // BTreeMap: sorted by name, as `set` lists them.
    let mut opts: BTreeMap<&str, String> = BTreeMap::new();
    if let Some(s) = env.get("FLANNEL_SUBNET").filter(|s| !s.is_empty()) {
        opts.insert("DOCKER_OPT_BIP", format!("--bip={s}"));
    }
    if let Some(m) = env.get("FLANNEL_MTU").filter(|s| !s.is_empty()) {
        opts.insert("DOCKER_OPT_MTU", format!("--mtu={m}"));
    }
    if let Some(v) = env.get("FLANNEL_IPMASQ").filter(|s| !s.is_empty()) {
        if !a.no_ipmasq {
            // Docker masquerades only when flannel does not.
            let docker = match v.as_str() {
                "true" => "false",
                "false" => "true",
                other => return Err(format!("Invalid value of FLANNEL_IPMASQ: {other}")),
            };
            opts.insert("DOCKER_OPT_IPMASQ", format!("--ip-masq={docker}"));
        }
    }
    let mut out = String::new();
    let mut all = if existing.is_empty() {
        String::new()
    } else {
        format!("{existing} ")
    };
    for (name, value) in &opts {
        if individual {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        all.push(' ');
        all.push_str(value);
    }
    if combined {
        out.push_str(&format!("{}=\"{all}\"\n", a.combined_key));
    }
    Ok(out)
}

/// The subnet route the script refuses to coexist with: FLANNEL_SUBNET's
/// network (host part minus one, as the script computes it).
pub fn subnet_of(env: &BTreeMap<String, String>) -> Option<Ipv4Network> {
    let s: Ipv4Network = env.get("FLANNEL_SUBNET")?.parse().ok()?;
    Ipv4Network::new(s.network(), s.prefix()).ok()
}

/// Whether `/proc/net/route` text holds `subnet` via a gateway.
pub fn routed_via_gateway(route_table: &str, subnet: Ipv4Network) -> Option<String> {
    route_table.lines().skip(1).find_map(|l| {
        let c: Vec<&str> = l.split_whitespace().collect();
        if c.len() < 8 {
            return None;
        }
        let hex = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| std::net::Ipv4Addr::from(u32::from_be(v)))
        };
        let (dst, gw, mask) = (hex(c[1])?, hex(c[2])?, hex(c[7])?);
        let flags = u32::from_str_radix(c[3], 16).ok()?;
        let len = u32::from(mask).count_ones() as u8;
        (dst == subnet.network() && len == subnet.prefix() && flags & 0x2 != 0)
            .then(|| format!("{subnet} via {gw} dev {}", c[0]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    fn args(i: bool, c: bool, m: bool, k: &str) -> DockerOptsArgs {
        DockerOptsArgs {
            individual: i,
            combined: c,
            no_ipmasq: m,
            combined_key: k.into(),
        }
    }

    #[test]
    fn golden_default_is_individual_and_combined() {
        let out = render(
            &parse_env(ENV),
            &args(false, false, false, "DOCKER_OPTS"),
            "",
        )
        .unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=10.5.34.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472\"\n"
        );
    }

    #[test]
    fn golden_each_option_combination() {
        let env = parse_env(ENV);
        assert_eq!(
            render(&env, &args(true, false, false, "X"), "").unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.5.34.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"
        );
        assert_eq!(
            render(&env, &args(false, true, false, "DOCKER_OPTS"), "").unwrap(),
            "DOCKER_OPTS=\" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472\"\n"
        );
        assert_eq!(
            render(&env, &args(false, true, true, "DOCKER_NETWORK_OPTIONS"), "").unwrap(),
            "DOCKER_NETWORK_OPTIONS=\" --bip=10.5.34.1/24 --mtu=1472\"\n"
        );
        assert_eq!(
            render(&env, &args(true, true, true, "DOCKER_OPTS"), "--debug").unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.5.34.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\"--debug  --bip=10.5.34.1/24 --mtu=1472\"\n"
        );
        // flannel masquerades: Docker must not.
        let masq = parse_env(&ENV.replace("IPMASQ=false", "IPMASQ=true"));
        assert!(render(&masq, &args(true, false, false, "K"), "")
            .unwrap()
            .contains("--ip-masq=false"));
        // No subnet file: just the (empty) combined key.
        assert_eq!(
            render(
                &BTreeMap::new(),
                &args(false, false, false, "DOCKER_OPTS"),
                ""
            )
            .unwrap(),
            "DOCKER_OPTS=\"\"\n"
        );
    }

    #[test]
    fn bad_ipmasq_is_refused() {
        let env = parse_env(&ENV.replace("IPMASQ=false", "IPMASQ=maybe"));
        assert_eq!(
            render(&env, &args(false, false, false, "DOCKER_OPTS"), ""),
            Err("Invalid value of FLANNEL_IPMASQ: maybe".into())
        );
    }

    #[test]
    fn quoted_values_and_gateway_routes() {
        let env = parse_env("export FLANNEL_SUBNET=\"10.5.34.1/24\"\n# c\nFLANNEL_MTU='1400'\n");
        assert_eq!(env["FLANNEL_SUBNET"], "10.5.34.1/24");
        assert_eq!(env["FLANNEL_MTU"], "1400");
        let sn = subnet_of(&env).unwrap();
        assert_eq!(sn.to_string(), "10.5.34.0/24");
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0022050A\t0100A8C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            routed_via_gateway(table, sn).as_deref(),
            Some("10.5.34.0/24 via 192.168.0.1 dev eth0")
        );
        let direct = table.replace("0003", "0001");
        assert_eq!(routed_via_gateway(&direct, sn), None);
    }
}
