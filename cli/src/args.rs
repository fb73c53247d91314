//! Command-line parsing for `bufshare`: a small hand-written parser (no dependency) that turns
//! the arguments into a [`Command`], or a one-line usage error.

use std::fmt;

/// Usage text printed by `--help` and after usage errors.
pub const USAGE: &str = "\
Usage: bufshare rtsp --socket SOCKET --path /PATH [--socket SOCKET2 --path /PATH2 ...]
                     [--port PORT] [--address ADDRESS] [--encoder \"ELEMENT [PROP=VALUE ...]\"]
       bufshare ls [DIR...]
       bufshare top [-b] [-n COUNT] [SOCKET|DIR...]
       bufshare dump [--json] SOCKET

rtsp: serves each bufshare producer socket as H.264 over RTSP at rtsp://ADDRESS:PORT/PATH.
One bufsharesrc and one encoder per path, shared by all clients of that path.

Options of rtsp:
  --socket SOCKET    bufsharesink socket to read frames from (repeatable)
  --path /PATH       mount point for the preceding --socket (one --path per --socket)
  --port PORT        TCP port of the RTSP server (default 8554)
  --address ADDRESS  address to listen on (default 0.0.0.0)
  --encoder DESC     H.264 encoder as a gst-launch fragment
                     (default: v4l2h264enc if present, else
                     x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30)
  -h, --help         show this help

rtsp runs until stopped (SIGINT/SIGTERM).

ls, top and dump connect to producers as monitors (they are not consumers: a producer's
num-clients does not count them) and read its statistics. DIR defaults to $BUFSHARE_DIR,
else /run/bufshare; the sockets in it are the producers.

ls: one line per socket: SOCKET, STATE (live; stale: connection refused, no producer;
  refused, version, denied, no-answer, error: the line ends with the cause), FPS (frames
  per second over the last second), CONSUMERS, CAPS.
top: a view redrawn every second: per producer its frame rate, frames held of its bound
  (max-held or the upstream pool's; no bound: the count alone), copies (frames copied into
  shareable memory), frames, backend and caps; under it each consumer: PID, NAME (its
  process name), UID, FRAMES, FPS, HELD (of its max-inflight), SKIPPED (frames it missed:
  latest wins), REL-P50 and REL-P99 (time from sending a frame to its release, over the
  last second). Producers that go away are shown as gone, new sockets in DIR are picked
  up. q or Ctrl-C quits. When standard output is not a terminal, or with -b (batch), each
  refresh is printed as plain text after the previous one, with no screen control codes.
  -n COUNT stops after COUNT refreshes (e.g. bufshare top -b -n 1 for one snapshot of all).
dump: one snapshot as text, or with --json as one JSON object: socket, protocol_version,
  time_ns, interval_ns, eos, caps, backend, frames, fps, copies, held, max_held (0: no
  bound), num_clients, consumers [client_id, pid, uid, name, frames, fps, held,
  max_inflight, skipped, releases, release_p50_ns, release_p99_ns (null: no release)].

Exit status: 1 on a runtime error (rtsp: missing element, port in use; dump: a socket
that is missing, stale, not a socket, refused, of an older protocol, or silent for 3 s;
top: a SOCKET that is missing or not a socket, or a DIR it cannot read, while a stale,
refused or silent producer is shown on its board; ls: a DIR that is missing or cannot be
read, while stale or refused sockets are rows of its table; one line on stderr names the
path and the cause), 2 on a usage error.";

/// Defaults for the `rtsp` subcommand.
pub const DEFAULT_PORT: u16 = 8554;
pub const DEFAULT_ADDRESS: &str = "0.0.0.0";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Rtsp(RtspArgs),
    Ls(LsArgs),
    Top(TopArgs),
    Dump(DumpArgs),
}

/// `bufshare ls [DIR...]`
#[derive(Debug, PartialEq, Eq)]
pub struct LsArgs {
    /// Empty: the default directory.
    pub dirs: Vec<String>,
}

/// `bufshare top [SOCKET|DIR...]`
#[derive(Debug, PartialEq, Eq)]
pub struct TopArgs {
    /// Empty: the default directory.
    pub targets: Vec<String>,
    /// Plain text snapshots one after the other, not a redrawn screen (`-b`; also
    /// whenever standard output is not a terminal).
    pub batch: bool,
    /// Stop after this many refreshes (`-n COUNT`); `None`: until quit.
    pub iterations: Option<u32>,
}

/// `bufshare dump [--json] SOCKET`
#[derive(Debug, PartialEq, Eq)]
pub struct DumpArgs {
    pub json: bool,
    pub socket: String,
}

/// One producer socket served at one mount path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub socket: String,
    pub path: String,
}

/// Options of `bufshare rtsp`.
#[derive(Debug, PartialEq, Eq)]
pub struct RtspArgs {
    pub mounts: Vec<Mount>,
    pub port: u16,
    pub address: String,
    /// `None`: pick the default encoder at run time.
    pub encoder: Option<String>,
}

/// A usage error: one line, printed to stderr with exit code 2.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage_err(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        None => Err(usage_err("missing subcommand (try: bufshare rtsp --help)")),
        Some("-h" | "--help" | "help") => Ok(Command::Help),
        Some("rtsp") => parse_rtsp(args),
        Some(cmd @ ("ls" | "top" | "dump")) => {
            let args: Vec<String> = args.collect();
            let before_dashes = args.iter().take_while(|a| *a != "--");
            if before_dashes
                .into_iter()
                .any(|a| a == "-h" || a == "--help")
            {
                return Ok(Command::Help);
            }
            match cmd {
                "ls" => positional(args, "ls").map(|dirs| Command::Ls(LsArgs { dirs })),
                "top" => parse_top(args),
                _ => parse_dump(args),
            }
        }
        Some(other) => Err(usage_err(format!("unknown subcommand '{other}'"))),
    }
}

/// Paths only (ls, top); `--` ends the options.
fn positional(args: Vec<String>, cmd: &str) -> Result<Vec<String>, UsageError> {
    let mut paths = Vec::new();
    let mut options = true;
    for arg in args {
        match arg.as_str() {
            "--" if options => options = false,
            a if options && a.starts_with('-') => {
                return Err(usage_err(format!("unknown option '{a}' for {cmd}")))
            }
            "" => return Err(usage_err(format!("empty path given to {cmd}"))),
            _ => paths.push(arg),
        }
    }
    Ok(paths)
}

fn parse_top(args: Vec<String>) -> Result<Command, UsageError> {
    let mut batch = false;
    let mut iterations = None;
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-b" | "--batch" => batch = true,
            "-n" | "--iterations" => {
                let value = args
                    .next()
                    .ok_or_else(|| usage_err(format!("{arg} needs a COUNT")))?;
                iterations = Some(parse_count(&arg, &value)?);
            }
            a if a.starts_with("--iterations=") => {
                iterations = Some(parse_count("--iterations", &a["--iterations=".len()..])?)
            }
            "--" => {
                rest.push(arg);
                rest.extend(args.by_ref());
            }
            _ => rest.push(arg),
        }
    }
    let targets = positional(rest, "top")?;
    Ok(Command::Top(TopArgs {
        targets,
        batch,
        iterations,
    }))
}

/// A refresh count: a whole number of at least 1.
fn parse_count(option: &str, value: &str) -> Result<u32, UsageError> {
    match value.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(usage_err(format!(
            "{option} takes a count of at least 1, not '{value}'"
        ))),
    }
}

fn parse_dump(args: Vec<String>) -> Result<Command, UsageError> {
    let mut json = false;
    let mut sockets = Vec::new();
    let mut options = true;
    for arg in args {
        match arg.as_str() {
            "--" if options => options = false,
            "--json" if options => json = true,
            a if options && a.starts_with('-') => {
                return Err(usage_err(format!("unknown option '{a}' for dump")))
            }
            "" => return Err(usage_err("empty socket path given to dump")),
            _ => sockets.push(arg),
        }
    }
    match sockets.len() {
        0 => Err(usage_err("dump needs a SOCKET")),
        1 => Ok(Command::Dump(DumpArgs {
            json,
            socket: sockets.remove(0),
        })),
        n => Err(usage_err(format!("dump takes one SOCKET, {n} given"))),
    }
}

fn parse_rtsp(mut args: impl Iterator<Item = String>) -> Result<Command, UsageError> {
    let mut sockets = Vec::new();
    let mut paths = Vec::new();
    let mut port = DEFAULT_PORT;
    let mut address = DEFAULT_ADDRESS.to_string();
    let mut encoder = None;

    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        // --name=value or --name value
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let known = ["--socket", "--path", "--port", "--address", "--encoder"];
        if !known.contains(&name.as_str()) {
            return Err(usage_err(format!("unknown option '{arg}'")));
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) if !v.is_empty() => v,
            _ => return Err(usage_err(format!("option '{name}' needs a value"))),
        };
        match name.as_str() {
            "--socket" => sockets.push(value),
            "--path" => {
                if !value.starts_with('/') || value.len() < 2 {
                    return Err(usage_err(format!(
                        "--path '{value}' must start with '/' and name a mount point, e.g. /cam"
                    )));
                }
                if sockets.len() <= paths.len() {
                    return Err(usage_err(format!(
                        "--path {value} has no --socket before it (give --socket S --path /P pairs)"
                    )));
                }
                paths.push(value);
            }
            "--port" => {
                port = value
                    .parse()
                    .map_err(|_| usage_err(format!("--port '{value}' is not a port number")))?;
            }
            "--address" => address = value,
            "--encoder" => encoder = Some(value),
            _ => unreachable!("option list checked above"),
        }
    }

    if sockets.is_empty() {
        return Err(usage_err("no --socket given"));
    }
    if sockets.len() != paths.len() {
        return Err(usage_err(format!(
            "{} --socket but {} --path: give one --path per --socket",
            sockets.len(),
            paths.len()
        )));
    }
    for (i, p) in paths.iter().enumerate() {
        if paths[..i].contains(p) {
            return Err(usage_err(format!("--path {p} given twice")));
        }
    }
    let mounts = sockets
        .into_iter()
        .zip(paths)
        .map(|(socket, path)| Mount { socket, path })
        .collect();
    Ok(Command::Rtsp(RtspArgs {
        mounts,
        port,
        address,
        encoder,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn pairs_and_options() {
        let Command::Rtsp(a) = p(&[
            "rtsp",
            "--socket",
            "/a.sock",
            "--path",
            "/a",
            "--socket=/b.sock",
            "--path=/b",
            "--port",
            "9000",
            "--address",
            "127.0.0.1",
            "--encoder",
            "x264enc bitrate=500",
        ])
        .unwrap() else {
            panic!("not rtsp")
        };
        assert_eq!(a.mounts.len(), 2);
        assert_eq!(a.mounts[1].socket, "/b.sock");
        assert_eq!(a.mounts[1].path, "/b");
        assert_eq!(a.port, 9000);
        assert_eq!(a.address, "127.0.0.1");
        assert_eq!(a.encoder.as_deref(), Some("x264enc bitrate=500"));
    }

    #[test]
    fn defaults() {
        let Command::Rtsp(a) = p(&["rtsp", "--socket", "/a.sock", "--path", "/a"]).unwrap() else {
            panic!("not rtsp")
        };
        assert_eq!(
            (a.port, a.address.as_str(), a.encoder),
            (8554, "0.0.0.0", None)
        );
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["rtsp", "--bogus"][..],
            &["rtsp", "--path", "/a"],
            &["rtsp", "--socket", "/a.sock"],
            &[
                "rtsp", "--socket", "/a.sock", "--socket", "/b.sock", "--path", "/a",
            ],
            &["rtsp", "--socket", "/a.sock", "--path", "a"],
            &[
                "rtsp", "--socket", "/a.sock", "--path", "/a", "--port", "70000",
            ],
            &["rtsp", "--socket", "/a.sock", "--path"],
            &[
                "rtsp", "--socket", "/a", "--path", "/a", "--socket", "/b", "--path", "/a",
            ],
            &["serve"],
            &[],
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn monitor_subcommands() {
        assert_eq!(p(&["ls"]), Ok(Command::Ls(LsArgs { dirs: vec![] })));
        assert_eq!(
            p(&["ls", "/a", "/b"]),
            Ok(Command::Ls(LsArgs {
                dirs: vec!["/a".into(), "/b".into()]
            }))
        );
        assert_eq!(
            p(&["top", "/a.sock", "--", "-odd"]),
            Ok(Command::Top(TopArgs {
                targets: vec!["/a.sock".into(), "-odd".into()],
                batch: false,
                iterations: None,
            }))
        );
        assert_eq!(
            p(&["top", "-b", "-n", "3", "/d"]),
            Ok(Command::Top(TopArgs {
                targets: vec!["/d".into()],
                batch: true,
                iterations: Some(3),
            }))
        );
        assert_eq!(
            p(&["top", "--iterations=1", "--", "-b"]),
            Ok(Command::Top(TopArgs {
                targets: vec!["-b".into()],
                batch: false,
                iterations: Some(1),
            }))
        );
        assert_eq!(
            p(&["dump", "--json", "/a.sock"]),
            Ok(Command::Dump(DumpArgs {
                json: true,
                socket: "/a.sock".into()
            }))
        );
        assert_eq!(
            p(&["dump", "/a.sock"]),
            Ok(Command::Dump(DumpArgs {
                json: false,
                socket: "/a.sock".into()
            }))
        );
        for bad in [
            &["dump"][..],
            &["dump", "--json"],
            &["dump", "/a", "/b"],
            &["dump", "--yaml", "/a"],
            &["ls", "--all"],
            &["top", "-d", "1"],
            &["top", "-n"],
            &["top", "-n", "0"],
            &["top", "-n", "x"],
            &["top", "--iterations=-1"],
            &["ls", ""],
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(p(&["dump", "--help"]), Ok(Command::Help));
        assert_eq!(p(&["top", "-h"]), Ok(Command::Help));
    }

    #[test]
    fn help() {
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["rtsp", "-h"]), Ok(Command::Help));
    }
}
