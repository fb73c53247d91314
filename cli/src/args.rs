//! Command-line parsing for `bufshare`: a small hand-written parser (no dependency) that turns
//! the arguments into a [`Command`], or a one-line usage error.

use std::fmt;

/// Usage text printed by `--help` and after usage errors.
pub const USAGE: &str = "\
Usage: bufshare rtsp --socket SOCKET --path /PATH [--socket SOCKET2 --path /PATH2 ...]
                     [--port PORT] [--address ADDRESS] [--encoder \"ELEMENT [PROP=VALUE ...]\"]

Serves each bufshare producer socket as H.264 over RTSP at rtsp://ADDRESS:PORT/PATH.
One bufsharesrc and one encoder per path, shared by all clients of that path.

Options:
  --socket SOCKET    bufsharesink socket to read frames from (repeatable)
  --path /PATH       mount point for the preceding --socket (one --path per --socket)
  --port PORT        TCP port of the RTSP server (default 8554)
  --address ADDRESS  address to listen on (default 0.0.0.0)
  --encoder DESC     H.264 encoder as a gst-launch fragment
                     (default: v4l2h264enc if present, else
                     x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30)
  -h, --help         show this help

Runs until stopped (SIGINT/SIGTERM). Exit status: 1 on a runtime error (missing element,
port in use), 2 on a usage error.";

/// Defaults for the `rtsp` subcommand.
pub const DEFAULT_PORT: u16 = 8554;
pub const DEFAULT_ADDRESS: &str = "0.0.0.0";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Rtsp(RtspArgs),
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
        Some(other) => Err(usage_err(format!("unknown subcommand '{other}'"))),
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
    fn help() {
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["rtsp", "-h"]), Ok(Command::Help));
    }
}
