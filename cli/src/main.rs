//! `bufshare`: command-line tool of the bufshare project. Subcommand `rtsp` serves bufshare
//! producers over RTSP (see `rtsp.rs`); `ls`, `top` and `dump` list, watch and dump producers
//! through the monitor role of their socket (`ls.rs`, `top.rs`, `dump.rs`, over the client in
//! `monitor.rs`); `args.rs` parses the command line.

mod args;
mod dump;
mod ls;
mod monitor;
mod rtsp;
mod top;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match args::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bufshare: {e} (see 'bufshare --help')");
            return ExitCode::from(2);
        }
    };
    match command {
        args::Command::Help => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        args::Command::Rtsp(a) => match rtsp::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(rtsp::RuntimeError(msg)) => {
                eprintln!("bufshare rtsp: {msg}");
                ExitCode::from(1)
            }
        },
        args::Command::Ls(a) => exit("ls", ls::run(&a)),
        args::Command::Top(a) => exit("top", top::run(&a)),
        args::Command::Dump(a) => exit("dump", dump::run(&a).map_err(|e| e.to_string())),
    }
}

/// Exit status of ls/top/dump: 1 with one line on stderr on failure.
fn exit(cmd: &str, r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("bufshare {cmd}: {msg}");
            ExitCode::from(1)
        }
    }
}
