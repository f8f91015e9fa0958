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
            let text = std::fs::read_to_string(&conf.subnet_file).map_err(|e| {
                CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!("reading {}", conf.subnet_file),
                    format!("{e}: is flanneld running?"),
                )
            })?;
            let fenv = cni::parse_flannel_env(&text)?;
            let d = cni::delegate_config(&conf, &fenv);
            let bytes = serde_json::to_vec(&d).expect("JSON");
            let file = scratch(&conf)?;
            // Saved for DEL (flannel's plugin does the same), 0600 in a 0700 dir.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&conf.data_dir)
                .map_err(|e| io_err("creating dataDir", e))?;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&file)
                .and_then(|mut f| f.write_all(&bytes))
                .map_err(|e| io_err("saving the delegate config", e))?;
            let ty = d["type"].as_str().unwrap_or("bridge").to_string();
            let (ok, out) = delegate(&ty, &bytes)?;
            Ok((out, ok))
        }
        "DEL" => {
            let file = scratch(&conf)?;
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                // Already gone (or never added): DEL must succeed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((Vec::new(), true))
                }
                Err(e) => return Err(io_err("reading the saved delegate config", e)),
            };
            let d: Value = serde_json::from_slice(&bytes).map_err(|e| {
                CniError::new(
                    code::DECODE,
                    "saved delegate config is corrupt",
                    e.to_string(),
                )
            })?;
            let ty = d["type"].as_str().unwrap_or("bridge").to_string();
            let (ok, out) = delegate(&ty, &bytes)?;
            if ok {
                let _ = std::fs::remove_file(&file);
            }
            Ok((out, ok))
        }
        "CHECK" => {
            let file = scratch(&conf)?;
            let bytes = std::fs::read(&file).map_err(|e| {
                CniError::new(3, "container unknown to the flannel plugin", e.to_string())
            })?;
            let mut d: Value = serde_json::from_slice(&bytes).map_err(|e| {
                CniError::new(
                    code::DECODE,
                    "saved delegate config is corrupt",
                    e.to_string(),
                )
            })?;
            let ours: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
            if let Some(prev) = ours.get("prevResult") {
                d["prevResult"] = prev.clone();
            }
            d["cniVersion"] = Value::String(conf.cni_version.clone());
            let ty = d["type"].as_str().unwrap_or("bridge").to_string();
            let (ok, out) = delegate(&ty, &serde_json::to_vec(&d).expect("JSON"))?;
            Ok((out, ok))
        }
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "",
        )),
    }
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

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
