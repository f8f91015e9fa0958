//! The `flannel` CNI plugin (a drop-in for flannel's cni-plugin): reads
//! subnet.env, renders the delegate config (bridge + host-local by default),
//! saves it under dataDir/<containerID> and runs the delegate from CNI_PATH.

use flannel::cni::{self, code, CniError, NetConf};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .map_err(|_| CniError::new(code::INVALID_ENV, format!("{name} is not set"), ""))
}

/// Runs the delegate plugin `ty` from CNI_PATH with `conf` on stdin; its
/// stdout (a result or a CNI error) is returned with whether it succeeded.
fn delegate(ty: &str, conf: &[u8]) -> Result<(bool, Vec<u8>), CniError> {
    if !cni::valid_plugin_type(ty) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("delegate type {ty:?} is not a plugin name"),
            "",
        ));
    }
    let path = env("CNI_PATH")?;
    let bin = std::env::split_paths(&path)
        .map(|d| d.join(ty))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("delegate plugin {ty:?} not found in CNI_PATH"),
                path.clone(),
            )
        })?;
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::IO,
                format!("running {}", bin.display()),
                e.to_string(),
            )
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf)
        .map_err(|e| CniError::new(code::IO, "writing to the delegate", e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::IO, "waiting for the delegate", e.to_string()))?;
    Ok((out.status.success(), out.stdout))
}

/// Runs the delegate with config `d`. CNI 1.1.0 changed no result format
/// (it added verbs), so when the delegate is older (Debian's bookworm
/// plugins stop at 1.0.0) it gets the config as 1.0.0 and its answer is
/// relabelled 1.1.0 for the runtime.
fn delegate_versioned(ty: &str, d: &Value) -> Result<(bool, Vec<u8>), CniError> {
    let want = d["cniVersion"].as_str().unwrap_or("");
    if want == "1.1.0" && !delegate_supports(ty, want) {
        let mut older = d.clone();
        older["cniVersion"] = Value::from("1.0.0");
        let (ok, out) = delegate(ty, &serde_json::to_vec(&older).expect("JSON"))?;
        let out = match serde_json::from_slice::<Value>(&out) {
            Ok(mut v) if v.get("cniVersion").is_some() => {
                v["cniVersion"] = Value::from(want);
                serde_json::to_vec(&v).expect("JSON")
            }
            _ => out,
        };
        return Ok((ok, out));
    }
    delegate(ty, &serde_json::to_vec(d).expect("JSON"))
}

/// Whether the delegate's VERSION answer lists `version`.
fn delegate_supports(ty: &str, version: &str) -> bool {
    let saved = std::env::var_os("CNI_COMMAND");
    std::env::set_var("CNI_COMMAND", "VERSION");
    let r = delegate(ty, br#"{"cniVersion":"1.0.0"}"#);
    if let Some(c) = saved {
        std::env::set_var("CNI_COMMAND", c);
    }
    r.ok()
        .and_then(|(_, out)| serde_json::from_slice::<Value>(&out).ok())
        .and_then(|v| v["supportedVersions"].as_array().cloned())
        .is_some_and(|a| a.iter().any(|x| x == version))
}

fn scratch(conf: &NetConf) -> Result<PathBuf, CniError> {
    let id = env("CNI_CONTAINERID")?;
    if !cni::valid_container_id(&id) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} is not a valid container ID"),
            "",
        ));
    }
    Ok(Path::new(&conf.data_dir).join(id))
}

fn io_err(what: &str, e: std::io::Error) -> CniError {
    CniError::new(code::IO, what.to_string(), e.to_string())
}

/// Runs one command; Ok(stdout, success) to print.
fn run(command: &str, stdin: &[u8]) -> Result<(Vec<u8>, bool), CniError> {
    let conf = NetConf::parse(stdin)?;
    match command {
        "ADD" => {
            // The runtime names the pod's namespace; without it there is
            // nothing to add to (code 4, before anything is written).
            if !env("CNI_NETNS").is_ok_and(|n| !n.is_empty()) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_NETNS is not set: ADD needs the container's network namespace",
                    "",
                ));
            }
            let text = std::fs::read_to_string(&conf.subnet_file).map_err(|e| {
                CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!("reading {}", conf.subnet_file),
                    format!("{e}: is flanneld running?"),
                )
            })?;
            let fenv = cni::parse_flannel_env(&text)?;
            let d = cni::delegate_config(&conf, &fenv)?;
            let bytes = serde_json::to_vec(&d).expect("JSON");
            let file = scratch(&conf)?;
            // Saved for DEL (flannel's plugin does the same), 0600 in a 0700
            // dir, written to a temporary file and renamed: a crash mid-write
            // never leaves a half file that would make DEL fail.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&conf.data_dir)
                .map_err(|e| io_err("creating dataDir", e))?;
            // The temp file's name cannot be another container's file
            // (`abc.tmp` as an ID): see `write_atomic_mode`.
            flannel::atomic_file::write_atomic_mode(&file, &bytes, 0o600)
                .map_err(|e| io_err("saving the delegate config", e))?;
            let ty = d["type"].as_str().unwrap_or("bridge").to_string();
            let added = delegate_versioned(&ty, &d);
            if !matches!(added, Ok((true, _))) {
                // A failed ADD leaves nothing behind: the delegate undoes
                // what it may have done (its IPAM allocation), then the
                // saved config goes, so no later DEL trips over it.
                std::env::set_var("CNI_COMMAND", "DEL");
                let _ = delegate_versioned(&ty, &d);
                let _ = std::fs::remove_file(&file);
            }
            let (ok, out) = added?;
            Ok((out, ok))
        }
        "DEL" => {
            let file = scratch(&conf)?;
            let saved = match std::fs::read(&file) {
                Ok(b) => serde_json::from_slice::<Value>(&b).ok(),
                // Already gone (or never added): DEL must succeed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((Vec::new(), true))
                }
                Err(_) => None,
            };
            // An unreadable or corrupt saved config: clean up what we can
            // with the delegate config rendered from today's subnet.env.
            let d = match saved {
                Some(d) => d,
                None => {
                    eprintln!("flannel: the saved delegate config {} is unreadable; deleting with one rendered from the subnet file", file.display());
                    match std::fs::read_to_string(&conf.subnet_file)
                        .ok()
                        .and_then(|t| cni::parse_flannel_env(&t).ok())
                        .and_then(|f| cni::delegate_config(&conf, &f).ok())
                    {
                        Some(d) => d,
                        None => {
                            eprintln!("flannel: no subnet file either; removing the saved config, the delegate's state may remain");
                            let _ = std::fs::remove_file(&file);
                            return Ok((Vec::new(), true));
                        }
                    }
                }
            };
            let ty = d["type"].as_str().unwrap_or("bridge").to_string();
            let (ok, out) = delegate_versioned(&ty, &d)?;
            if ok {
                let _ = std::fs::remove_file(&file);
            }
            Ok((out, ok))
        }
        "CHECK" => {
            let file = scratch(&conf)?;
            if let Err(e) = std::fs::metadata(&file) {
                return Err(CniError::new(
                    3,
                    "container unknown to the flannel plugin",
                    e.to_string(),
                ));
            }
            // flannel's plugin answers success without looking; we check
            // that the container still has its interface and addresses.
            let ours: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
            let ifname = env("CNI_IFNAME")?;
            let netns = env("CNI_NETNS")?;
            let want: Vec<String> = ours["prevResult"]["ips"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|ip| ip["address"].as_str())
                        .filter_map(|a| a.split('/').next())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            check_container(&netns, &ifname, &want)?;
            Ok((Vec::new(), true))
        }
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "",
        )),
    }
}

use std::os::unix::fs::DirBuilderExt;

/// CHECK: in the container's network namespace, `ifname` exists and holds
/// every address of the cached result. Runs on a thread that enters the
/// namespace (setns affects only the calling thread).
fn check_container(netns: &str, ifname: &str, want: &[String]) -> Result<(), CniError> {
    let (netns, ifname, want) = (netns.to_string(), ifname.to_string(), want.to_vec());
    std::thread::spawn(move || -> Result<(), CniError> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&netns).map_err(|e| {
            CniError::new(
                code::INVALID_ENV,
                format!("opening CNI_NETNS {netns}"),
                e.to_string(),
            )
        })?;
        // SAFETY: setns on a valid namespace fd, for this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io_err(
                "entering the container's network namespace",
                std::io::Error::last_os_error(),
            ));
        }
        let addrs = flannel::iface::ipv4_addresses().map_err(|e| io_err("listing addresses", e))?;
        let have: Vec<String> = addrs
            .iter()
            .filter(|(n, _)| *n == ifname)
            .map(|(_, a)| a.to_string())
            .collect();
        if have.is_empty() && flannel::iface::mtu(&ifname).is_err() {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("interface {ifname} not found in the container"),
                netns,
            ));
        }
        if let Some(missing) = want.iter().find(|a| !have.contains(a)) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("address {missing} is not on {ifname} in the container"),
                format!("has {have:?}"),
            ));
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(CniError::new(
            code::IO,
            "checking the container panicked",
            "",
        ))
    })
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    if command != "VERSION" || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .unwrap_or_else(|| "1.0.0".into());
    if command == "VERSION" {
        println!("{}", cni::version_json(&version));
        return ExitCode::SUCCESS;
    }
    if command.is_empty() {
        eprintln!("flannel CNI plugin {}: run by a container runtime with CNI_COMMAND set (ADD, DEL, CHECK, VERSION)", env!("CARGO_PKG_VERSION"));
        return ExitCode::FAILURE;
    }
    match run(&command, &stdin) {
        Ok((out, ok)) => {
            let _ = std::io::stdout().write_all(&out);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
