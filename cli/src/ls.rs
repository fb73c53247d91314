//! `bufshare ls [DIR...]`: the producers whose sockets are in the given directories
//! (default `$BUFSHARE_DIR`, else /run/bufshare), one line each: socket, live or stale,
//! frame rate, consumers, caps. Each socket gets one monitor snapshot (`monitor.rs`), all
//! at once on threads of their own, so a producer that does not answer costs the timeout
//! once, not once per socket. `scan` is also how `top` finds producers.

use std::path::{Path, PathBuf};

use gstbufshare::protocol::Stats;

use crate::args::LsArgs;
use crate::monitor::{self, MonitorError};

/// The sockets in `dirs` (an argument that is itself a socket counts as found), sorted.
/// Fails with one line when a directory cannot be read.
pub fn scan(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    for dir in dirs {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if meta.file_type().is_socket() {
            found.push(dir.clone());
            continue;
        }
        if !meta.is_dir() {
            return Err(format!("{}: not a directory or a socket", dir.display()));
        }
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            // Follows symlinks: a link to a producer's socket is a producer.
            if std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                found.push(path);
            }
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// A snapshot of each socket, taken in parallel, in the order given.
pub fn probe_all(sockets: &[PathBuf]) -> Vec<Result<Stats, MonitorError>> {
    let handles: Vec<_> = sockets
        .iter()
        .map(|p| {
            let p = p.clone();
            std::thread::spawn(move || monitor::snapshot(&p))
        })
        .collect();
    handles
        .into_iter()
        .zip(sockets)
        .map(|(h, p)| {
            h.join().unwrap_or_else(|_| {
                Err(MonitorError {
                    path: p.clone(),
                    failure: monitor::Failure::Io("internal error".into()),
                })
            })
        })
        .collect()
}

/// The table: a header, then one line per socket.
pub fn table(sockets: &[PathBuf], results: &[Result<Stats, MonitorError>]) -> Vec<String> {
    let width = sockets
        .iter()
        .map(|p| p.display().to_string().len())
        .max()
        .unwrap_or(0)
        .max("SOCKET".len());
    let mut lines = vec![format!(
        "{:<width$}  {:<9} {:>6} {:>9}  CAPS",
        "SOCKET", "STATE", "FPS", "CONSUMERS"
    )];
    for (path, r) in sockets.iter().zip(results) {
        let line = match r {
            Ok(s) => format!(
                "{:<width$}  {:<9} {:>6} {:>9}  {}",
                path.display(),
                "live",
                monitor::fps(s.fps_milli),
                s.num_consumers,
                if s.caps.is_empty() { "-" } else { &s.caps }
            ),
            Err(e) => format!(
                "{:<width$}  {:<9} {:>6} {:>9}  {}",
                path.display(),
                e.state(),
                "-",
                "-",
                e.cause()
            ),
        };
        lines.push(line);
    }
    lines
}

pub fn run(args: &LsArgs) -> Result<(), String> {
    let dirs: Vec<PathBuf> = if args.dirs.is_empty() {
        vec![monitor::default_dir()]
    } else {
        args.dirs.iter().map(PathBuf::from).collect()
    };
    let sockets = scan(&dirs)?;
    if sockets.is_empty() {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        eprintln!("bufshare ls: no sockets in {}", names.join(", "));
        return Ok(());
    }
    let results = probe_all(&sockets);
    for line in table(&sockets, &results) {
        println!("{line}");
    }
    Ok(())
}

/// Whether `path` names a directory (for `top`, which takes sockets and directories).
pub fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_dir())
}
