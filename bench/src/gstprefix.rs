//! Finding unixfdsink/unixfdsrc (GStreamer >= 1.24) for the unixfd rows.
//!
//! Either this process's GStreamer has them (`gst::ElementFactory::find`),
//! or the environment variable `BUFSHARE_BENCH_GST_PREFIX` names the install
//! prefix of another GStreamer (e.g. `/opt/gst-1.24`, built with
//! `meson setup --prefix=/opt/gst-1.24`). Then only the unixfd children run on
//! that GStreamer, with:
//!
//! - `LD_LIBRARY_PATH`: the prefix's library directories first
//!   (`lib/<multiarch>`, `lib64`, `lib`), so the child (this executable,
//!   dynamically linked to libgstreamer-1.0 and friends) loads that core;
//!   plugins of a newer GStreamer do not load into an older core;
//! - `GST_PLUGIN_SYSTEM_PATH_1_0`: the prefix's `gstreamer-1.0` plugin
//!   directories instead of the system's (mixing both would register two
//!   copies of the same plugins);
//! - `GST_PLUGIN_SCANNER_1_0`: the prefix's gst-plugin-scanner, if found;
//! - `GST_REGISTRY_1_0`: a registry file of its own in the bench's temporary
//!   directory: one cache shared by two GStreamer versions would be rebuilt
//!   by every child that starts on the other version.
//!
//! `GST_PLUGIN_PATH` (the bufshare plugin's directory, see main.rs) is
//! inherited unchanged. Whether the prefix really has unixfdsink is asked of
//! a child (`bufshare-bench __probe unixfdsink`) started with that
//! environment, since this process runs on the system GStreamer.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable naming a GStreamer install prefix.
pub const PREFIX_VAR: &str = "BUFSHARE_BENCH_GST_PREFIX";
/// How long the probe child may take (a first registry scan included).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the unixfd transport can be measured, and how.
pub enum Unixfd {
    /// Usable: children get `env`; `source` says which GStreamer that is.
    Available {
        env: Vec<(OsString, OsString)>,
        source: String,
    },
    /// Not usable, and why (printed in the unixfd rows).
    Missing(String),
}

/// Decides where unixfdsink comes from. After `gst::init`.
pub fn find_unixfd(exe: &Path, tmp: &Path) -> Unixfd {
    let system = gst::version();
    let system_name = format!("GStreamer {}.{}", system.0, system.1);
    let Some(prefix) = std::env::var_os(PREFIX_VAR).filter(|p| !p.is_empty()) else {
        if gst::ElementFactory::find("unixfdsink").is_some()
            && gst::ElementFactory::find("unixfdsrc").is_some()
        {
            return Unixfd::Available {
                env: Vec::new(),
                source: format!("{} (this process's)", gst::version_string()),
            };
        }
        return Unixfd::Missing(format!(
            "not installed ({system_name}; set {PREFIX_VAR} to a GStreamer >= 1.24 prefix)"
        ));
    };
    let prefix = PathBuf::from(prefix);
    let env = match prefix_env(&prefix, tmp) {
        Ok(env) => env,
        Err(e) => return Unixfd::Missing(format!("{PREFIX_VAR}={}: {e}", prefix.display())),
    };
    // The unixfd pipelines use only that GStreamer's plugins (core, base, bad).
    match probe(
        exe,
        &env,
        &["unixfdsink", "unixfdsrc", "videotestsrc", "fakesink"],
    ) {
        Ok((version, missing)) if missing.is_empty() => Unixfd::Available {
            env,
            source: format!("{version} from {PREFIX_VAR}={}", prefix.display()),
        },
        Ok((version, missing)) => Unixfd::Missing(format!(
            "not installed: {PREFIX_VAR}={} runs {version}, which has no {}",
            prefix.display(),
            missing.join(", ")
        )),
        Err(e) => Unixfd::Missing(format!(
            "{PREFIX_VAR}={}: probing it failed: {e}",
            prefix.display()
        )),
    }
}

/// The environment that makes a child run on the GStreamer in `prefix`.
fn prefix_env(prefix: &Path, tmp: &Path) -> Result<Vec<(OsString, OsString)>, String> {
    if !prefix.is_dir() {
        return Err("not a directory".into());
    }
    let lib_dirs = library_dirs(prefix);
    let plugin_dirs: Vec<PathBuf> = lib_dirs
        .iter()
        .map(|d| d.join("gstreamer-1.0"))
        .filter(|d| d.is_dir())
        .collect();
    if plugin_dirs.is_empty() {
        return Err("no lib/<multiarch>/gstreamer-1.0, lib64/gstreamer-1.0 or \
                    lib/gstreamer-1.0 plugin directory there"
            .into());
    }
    let mut ld_path: Vec<PathBuf> = lib_dirs.clone();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld_path.extend(std::env::split_paths(&old));
    }
    let join = |dirs: &[PathBuf]| std::env::join_paths(dirs).map_err(|e| e.to_string());
    let mut env = vec![
        (OsString::from("LD_LIBRARY_PATH"), join(&ld_path)?),
        (
            OsString::from("GST_PLUGIN_SYSTEM_PATH_1_0"),
            join(&plugin_dirs)?,
        ),
        (
            OsString::from("GST_REGISTRY_1_0"),
            tmp.join("registry-prefix.bin").into_os_string(),
        ),
    ];
    // Installed layouts: meson's default (libexec), Debian's (lib/<multiarch>/gstreamer1.0).
    let mut scanners = vec![prefix.join("libexec/gstreamer-1.0/gst-plugin-scanner")];
    for d in &lib_dirs {
        scanners.push(d.join("gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"));
        scanners.push(d.join("gstreamer-1.0/gst-plugin-scanner"));
    }
    if let Some(scanner) = scanners.into_iter().find(|s| s.is_file()) {
        env.push((
            OsString::from("GST_PLUGIN_SCANNER_1_0"),
            scanner.into_os_string(),
        ));
    }
    Ok(env)
}

/// `lib/<multiarch>` (any `lib/*-linux-*`), `lib64` and `lib`, those that exist.
fn library_dirs(prefix: &Path) -> Vec<PathBuf> {
    let lib = prefix.join("lib");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&lib)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains("-linux-"))
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.extend(
        [prefix.join("lib64"), lib]
            .into_iter()
            .filter(|d| d.is_dir()),
    );
    dirs
}

/// Runs `bufshare-bench __probe ELEMENTS...` with `env`: returns the
/// GStreamer version the child runs on and the elements it does not have.
fn probe(
    exe: &Path,
    env: &[(OsString, OsString)],
    elements: &[&str],
) -> Result<(String, Vec<String>), String> {
    let mut child = Command::new(exe)
        .arg("__probe")
        .args(elements)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the probe: {e}"))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {PROBE_TIMEOUT:?}"));
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("version "))
        .map(str::to_string);
    let Some(version) = version.filter(|_| status.success()) else {
        let last = err.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "{status}{}",
            last.map(|l| format!(": {l}")).unwrap_or_default()
        ));
    };
    let missing = out
        .lines()
        .filter_map(|l| l.strip_prefix("missing "))
        .map(str::to_string)
        .collect();
    Ok((version, missing))
}

/// Entry point of `bufshare-bench __probe ELEMENT...`: prints `version TEXT`
/// and `missing NAME` for each element this process's GStreamer lacks.
pub fn probe_main(elements: &[String]) -> i32 {
    if let Err(e) = gst::init() {
        eprintln!("gst::init: {e}");
        return 1;
    }
    println!("version {}", gst::version_string());
    for name in elements {
        if gst::ElementFactory::find(name).is_none() {
            println!("missing {name}");
        }
    }
    0
}
