//! The `flannel` CNI plugin's logic, without I/O: flannel's network config
//! (defaults as flannel's cni-plugin), the delegate config it renders from
//! subnet.env, and CNI error/version documents. The CNI protocol is small
//! (environment variables, JSON on stdin/stdout, exec of the delegate), so
//! it is implemented here rather than through a crate.

use crate::subnet_env::vars;
use ipnetwork::Ipv4Network;
use serde_json::{json, Map, Value};

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
pub const SUPPORTED_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// CNI error codes (SPEC.md, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific (≥ 100): CHECK found the container's network broken.
    pub const CHECK_FAILED: u32 = 100;
}

#[derive(Debug, Clone, PartialEq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error document for stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}

/// flannel's plugin config (the part it reads; the rest is passed on).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: String,
    pub data_dir: String,
    pub delegate: Map<String, Value>,
    pub ipam: Map<String, Value>,
    /// Runtime arguments (portMappings, bandwidth, …) the runtime put in our
    /// config; passed on to the delegate.
    pub runtime_config: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "failed to parse network config",
                e.to_string(),
            )
        })?;
        let o = v.as_object().ok_or_else(|| {
            CniError::new(code::DECODE, "network config is not a JSON object", "")
        })?;
        let s = |k: &str, d: &str| o.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
        let obj = |k: &str| -> Result<Map<String, Value>, CniError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(_) => Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("\"{k}\" must be an object"),
                    "",
                )),
            }
        };
        let name = s("name", "");
        if name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network config has no \"name\"",
                "",
            ));
        }
        let cni_version = s("cniVersion", "0.1.0");
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("unsupported cniVersion {cni_version:?}"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(NetConf {
            cni_version,
            name,
            subnet_file: s("subnetFile", DEFAULT_SUBNET_FILE),
            data_dir: s("dataDir", DEFAULT_DATA_DIR),
            delegate: obj("delegate")?,
            ipam: obj("ipam")?,
            runtime_config: o.get("runtimeConfig").filter(|v| !v.is_null()).cloned(),
        })
    }
}

/// The values of subnet.env the plugin uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelEnv {
    pub network: Option<Ipv4Network>,
    pub subnet: Option<Ipv4Network>,
    pub mtu: Option<u32>,
    pub ipmasq: Option<bool>,
}

/// Reads subnet.env text as flannel's plugin does; a missing FLANNEL_NETWORK
/// or FLANNEL_SUBNET is an error (flanneld has not started yet: try again).
pub fn parse_flannel_env(text: &str) -> Result<FlannelEnv, CniError> {
    let env = vars(text);
    let net = |k: &str| -> Result<Option<Ipv4Network>, CniError> {
        env.get(k)
            .map(|v| {
                let n: Ipv4Network = v.parse().map_err(|_| {
                    CniError::new(code::INVALID_CONFIG, format!("{k}={v} is not a CIDR"), "")
                })?;
                Ok(Ipv4Network::new(n.network(), n.prefix()).expect("valid prefix"))
            })
            .transpose()
    };
    let fenv = FlannelEnv {
        network: net("FLANNEL_NETWORK")?,
        subnet: net("FLANNEL_SUBNET")?,
        mtu: env.get("FLANNEL_MTU").and_then(|v| v.parse().ok()),
        ipmasq: env.get("FLANNEL_IPMASQ").and_then(|v| v.parse().ok()),
    };
    if fenv.network.is_none() || fenv.subnet.is_none() {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "subnet.env lacks FLANNEL_NETWORK or FLANNEL_SUBNET",
            "is flanneld running?",
        ));
    }
    Ok(fenv)
}

/// The delegate's network config, as flannel's plugin renders it: name and
/// cniVersion from ours; type `bridge`, `isGateway: true` (bridge only),
/// `ipMasq` = !FLANNEL_IPMASQ, `mtu` = FLANNEL_MTU unless given; IPAM
/// `host-local` (unless given) with one range, FLANNEL_SUBNET, and a route
/// to FLANNEL_NETWORK added to any routes given.
/// As flannel's plugin, a delegate may not set `name` (it is the network's)
/// or `ipam` (flannel's `ipam` key sets it); and its `type` must be a plain
/// plugin name, as libcni requires, so it cannot run a program outside
/// CNI_PATH.
pub fn delegate_config(n: &NetConf, f: &FlannelEnv) -> Result<Value, CniError> {
    for k in ["name", "ipam"] {
        if n.delegate.contains_key(k) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("\"delegate\" may not set \"{k}\""),
                if k == "ipam" {
                    "set it with the top-level \"ipam\" key"
                } else {
                    ""
                },
            ));
        }
    }
    if let Some(t) = n.delegate.get("type") {
        let ok = t.as_str().is_some_and(valid_plugin_type);
        if !ok {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("delegate type {t} is not a plugin name"),
                "a plugin name has no '/' and is not '.' or '..'",
            ));
        }
    }
    Ok(render_delegate(n, f))
}

/// A plugin name libcni would look up in CNI_PATH: not empty, no path
/// separator, not `.` or `..`, no NUL.
pub fn valid_plugin_type(t: &str) -> bool {
    !t.is_empty() && !t.contains('/') && !t.contains('\0') && t != "." && t != ".."
}

fn render_delegate(n: &NetConf, f: &FlannelEnv) -> Value {
    let mut d = n.delegate.clone();
    d.insert("name".into(), json!(n.name));
    d.entry("type").or_insert(json!("bridge"));
    if !d.contains_key("ipMasq") {
        d.insert("ipMasq".into(), json!(!f.ipmasq.unwrap_or(false)));
    }
    if let (false, Some(mtu)) = (d.contains_key("mtu"), f.mtu) {
        d.insert("mtu".into(), json!(mtu));
    }
    if d.get("type") == Some(&json!("bridge")) {
        d.entry("isGateway").or_insert(json!(true));
    }
    d.insert("cniVersion".into(), json!(n.cni_version));
    let mut ipam = n.ipam.clone();
    ipam.entry("type").or_insert(json!("host-local"));
    if let Some(sn) = f.subnet {
        ipam.insert("ranges".into(), json!([[{"subnet": sn.to_string()}]]));
    }
    let mut routes = match ipam.remove("routes") {
        Some(Value::Array(r)) => r,
        _ => Vec::new(),
    };
    if let Some(nw) = f.network {
        routes.push(json!({"dst": nw.to_string()}));
    }
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    if let Some(rc) = &n.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    Value::Object(d)
}

/// The VERSION document.
pub fn version_json(cni_version: &str) -> String {
    json!({"cniVersion": cni_version, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// A container ID safe to use as a file name in the data dir.
pub fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && id != "."
        && id != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn defaults_render_flannels_delegate() {
        let n =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel"}"#).unwrap();
        assert_eq!(n.subnet_file, "/run/flannel/subnet.env");
        assert_eq!(n.data_dir, "/var/lib/cni/flannel");
        let d = delegate_config(&n, &parse_flannel_env(ENV).unwrap()).unwrap();
        assert_eq!(
            d,
            json!({
                "name": "cbr0", "type": "bridge", "cniVersion": "1.0.0",
                "ipMasq": true, "mtu": 1472, "isGateway": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.5.34.0/24"}]],
                         "routes": [{"dst": "10.5.0.0/16"}]}
            })
        );
    }

    #[test]
    fn given_values_win_and_routes_are_kept() {
        let n = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"flannel","subnetFile":"/x","dataDir":"/d",
                "delegate":{"type":"bridge","ipMasq":false,"mtu":1400,"isGateway":false,"bridge":"cni9"},
                "ipam":{"dataDir":"/ipam","routes":[{"dst":"192.168.9.0/24"}]}}"#,
        )
        .unwrap();
        let mut env = parse_flannel_env(ENV).unwrap();
        env.ipmasq = Some(true);
        let d = delegate_config(&n, &env).unwrap();
        assert_eq!(d["ipMasq"], json!(false));
        assert_eq!(d["mtu"], json!(1400));
        assert_eq!(d["isGateway"], json!(false));
        assert_eq!(d["bridge"], json!("cni9"));
        assert_eq!(d["cniVersion"], json!("0.4.0"));
        assert_eq!(d["ipam"]["dataDir"], json!("/ipam"));
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst":"192.168.9.0/24"},{"dst":"10.5.0.0/16"}])
        );
    }

    #[test]
    fn flannel_ipmasq_true_means_no_delegate_masquerade() {
        let n = NetConf::parse(br#"{"name":"cbr0","type":"flannel","delegate":{"type":"ptp"}}"#)
            .unwrap();
        let env = parse_flannel_env(&ENV.replace("IPMASQ=false", "IPMASQ=true")).unwrap();
        let d = delegate_config(&n, &env).unwrap();
        assert_eq!(d["ipMasq"], json!(false));
        assert!(d.get("isGateway").is_none(), "isGateway is for bridge only");
    }

    #[test]
    fn delegate_name_ipam_and_odd_types_are_refused_runtime_config_passed_on() {
        let env = parse_flannel_env(ENV).unwrap();
        let conf = |delegate: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"1.1.0","name":"cbr0","type":"flannel","delegate":{delegate},
                    "runtimeConfig":{{"portMappings":[{{"hostPort":8080,"containerPort":80,"protocol":"tcp"}}]}}}}"#)
                .as_bytes(),
            )
            .unwrap()
        };
        for bad in [
            r#"{"name":"x"}"#,
            r#"{"ipam":{"type":"dhcp"}}"#,
            r#"{"type":"../evil/x"}"#,
            r#"{"type":"/bin/sh"}"#,
            r#"{"type":".."}"#,
            r#"{"type":""}"#,
            r#"{"type":7}"#,
        ] {
            let e = delegate_config(&conf(bad), &env).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
        }
        let d = delegate_config(&conf(r#"{"type":"bridge"}"#), &env).unwrap();
        assert_eq!(
            d["runtimeConfig"]["portMappings"][0]["hostPort"],
            json!(8080)
        );
        assert_eq!(d["cniVersion"], json!("1.1.0"));
        assert!(valid_plugin_type("bridge") && valid_plugin_type("my-plugin.v2"));
    }

    #[test]
    fn errors_carry_cni_codes() {
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, code::DECODE);
        assert_eq!(
            NetConf::parse(br#"{"type":"flannel"}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            NetConf::parse(br#"{"name":"x","cniVersion":"9.9.9"}"#)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            NetConf::parse(br#"{"name":"x","delegate":7}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse_flannel_env("FLANNEL_MTU=1\n").unwrap_err().code,
            code::TRY_AGAIN_LATER
        );
        let e = CniError::new(7, "bad", "worse").to_json("1.0.0");
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion":"1.0.0","code":7,"msg":"bad","details":"worse"})
        );
        assert!(!valid_container_id("../etc"));
        assert!(valid_container_id("abc-123_x.y"));
    }
}
